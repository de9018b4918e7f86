"""On-policy distillation (distill.py's ``on_policy`` stage): student rollouts, teacher
scoring, generalized JSD per completion token through ``ops.linear_jsd``.

One optimizer step:
  1. rollout: ``micro_batch_size * grad_accum`` prompts drawn from ``data.sources`` (a
     seeded weighted mix, each source reshuffled per epoch; :class:`PromptSampler`) are
     answered by the live student (``LLM.from_model``; one seeded generator per request, so a
     resumed run samples the same tokens). With ``lambda_on_policy < 1`` the step instead
     takes that many chat samples of ``off_policy_data`` with probability 1 - lambda.
  2. update, per micro-batch of ``micro_batch_size`` sequences (prompt + reply ids, right
     padded; causal attention never sees the padding on the right): the teacher's final
     hidden states (no grad), the student's, and
     ``ops.linear_jsd(h_S, W_S, h_T, W_T, labels, beta, temperature, reduction="sum")``
     where labels are the shifted sequence with -100 on the prompt and padding rows, so
     only rows predicting a reply token count. The sum is divided by the step's reply-token
     count (token-level mean over the step, whatever the micro-batch split).
  3. metric ``kl``: the exact KL(P_S || P_T) at temperature 1 on the same rows (no grad;
     the loss itself when beta = 1 and temperature = 1).
"""
from __future__ import annotations

import contextlib
import random
import time

import torch

from qwen3_fast.train.data import IGNORE_INDEX, _rng_state, _set_rng_state, load_tokenizer
from qwen3_fast.train.distill import (OnPolicyConfig, _autocast, _single_process,
                                      load_teacher, shift_labels, train_loop)
from qwen3_fast.train.distill_data import Prompt, load_prompts, read_samples


class PromptSampler:
    """Seeded weighted mix of prompt sources, each shuffled per epoch; resumable (JSON)."""

    def __init__(self, sources: list[list], weights: list[float], seed: int):
        self.sources, self.weights = sources, weights
        self.rng = random.Random(seed)
        self.orders = [[] for _ in sources]
        self.pos = [0] * len(sources)
        self.epochs = [0] * len(sources)

    def next(self):
        s = self.rng.choices(range(len(self.sources)), weights=self.weights)[0]
        if self.pos[s] >= len(self.orders[s]):
            if self.orders[s]:
                self.epochs[s] += 1
            self.orders[s] = list(range(len(self.sources[s])))
            self.rng.shuffle(self.orders[s])
            self.pos[s] = 0
        self.pos[s] += 1
        return self.sources[s][self.orders[s][self.pos[s] - 1]]

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "orders": self.orders, "pos": self.pos,
                "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.orders = [list(o) for o in state["orders"]]
        self.pos, self.epochs = list(state["pos"]), list(state["epochs"])


class _State:
    """What a checkpoint keeps of the data side: the prompt mix and the lambda draws."""

    def __init__(self, prompts: PromptSampler, offline: PromptSampler | None, seed: int):
        self.prompts, self.offline = prompts, offline
        self.mix_rng = random.Random(seed + 7)

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(), "mix_rng": _rng_state(self.mix_rng),
                "offline": None if self.offline is None else self.offline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        _set_rng_state(self.mix_rng, state["mix_rng"])
        if self.offline is not None and state["offline"] is not None:
            self.offline.load_state_dict(state["offline"])


def rollout_modes(prompt: Prompt, mode: str) -> list[bool]:
    """enable_thinking values a prompt is rolled out with."""
    if mode == "both":
        return [True, False]
    if mode == "prompt":
        return [True if prompt.enable_thinking is None else prompt.enable_thinking]
    return [mode == "thinking"]


def rollout(engine, prompts: list[Prompt], mode: str, sampling: dict, seed: int
            ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per rollout; one engine call per mode."""
    from qwen3_fast.generate.params import SamplingParams

    jobs = [(p, t) for p in prompts for t in rollout_modes(p, mode)]
    out: list = [None] * len(jobs)
    for thinking in (True, False):
        idx = [i for i, (_, t) in enumerate(jobs) if t == thinking]
        if not idx:
            continue
        params = [SamplingParams(**sampling, seed=seed + i) for i in idx]
        res = engine.chat([jobs[i][0].messages for i in idx], enable_thinking=thinking,
                          sampling=params)
        for i, r in zip(idx, res):
            out[i] = (list(r.prompt_token_ids), list(r.token_ids))
    return out


def pack_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], labels [B, S]) right-padded; labels = the reply ids, -100 on the
    prompt and padding (not shifted)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        labels[b, len(p):len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, labels


def jsd_on_sequences(student, teacher, ids: torch.Tensor, labels: torch.Tensor, beta: float,
                     temperature: float, chunk_size=None, autocast=None):
    """(summed generalized JSD over the reply rows with its graph, summed KL(S||T) at T=1
    without one, rows counted). ids / labels [B, S] on the models' device."""
    from qwen3_fast import ops

    ctx = autocast if autocast is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        t_hidden = teacher(ids, return_logits=False).hidden_states
    with ctx:
        s_hidden = student(ids, return_logits=False).hidden_states
    target = shift_labels(labels).reshape(-1)
    ws, wt = student.lm_head.weight, teacher.lm_head.weight
    hs = s_hidden.reshape(target.shape[0], -1).to(ws.dtype)
    ht = t_hidden.reshape(target.shape[0], -1).to(wt.dtype)
    loss = ops.linear_jsd(hs, ws, ht, wt, target, beta=beta, temperature=temperature,
                          chunk_size=chunk_size, reduction="sum")
    if beta == 1.0 and temperature == 1.0:
        kl = loss.detach()
    else:
        with torch.no_grad():
            kl = ops.linear_jsd(hs.detach(), ws.detach(), ht, wt, target, beta=1.0,
                                temperature=1.0, chunk_size=chunk_size, reduction="sum")
    return loss, float(kl), int((target != IGNORE_INDEX).sum())


def run_on_policy(cfg: OnPolicyConfig, env) -> list[float]:
    from qwen3_fast.generate import LLM
    from qwen3_fast.train.sft_data import tokenize_chat
    from qwen3_fast.train.trainer import build_model, seed_everything

    _single_process(env, "on-policy distillation")
    teacher, teacher_tok, spec = load_teacher(cfg, env.device)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(spec)
    student = build_model(cfg, env.device)
    engine = LLM.from_model(student, tokenizer, max_batch_size=cfg.gen_batch_size,
                            max_seq_len=cfg.max_seq_len)
    weights = [s.weight for s in cfg.data.sources]
    prompts = PromptSampler([load_prompts([s.path]) for s in cfg.data.sources], weights,
                            cfg.data.seed)
    offline = None
    if cfg.lambda_on_policy < 1.0:
        offline = PromptSampler([read_samples(cfg.off_policy_data)], [1.0], cfg.data.seed + 1)
    state = _State(prompts, offline, cfg.data.seed)
    per_step = cfg.micro_batch_size * cfg.grad_accum
    sampling = cfg.sampling.params()

    def step_fn(step: int):
        t0 = time.perf_counter()
        on_policy = offline is None or state.mix_rng.random() < cfg.lambda_on_policy
        if on_policy:
            batch = [prompts.next() for _ in range(per_step)]
            seqs = rollout(engine, batch, cfg.mode, sampling, cfg.seed * 1_000_003 + step * 4096)
        else:
            seqs = []
            for _ in range(per_step):
                ids, labels = tokenize_chat(offline.next(), tokenizer)
                cut = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
                end = max(i for i, y in enumerate(labels) if y != IGNORE_INDEX) + 1
                seqs.append((ids[:cut], ids[cut:end]))
        rollout_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = max(1, sum(len(r) for _, r in seqs))
        loss_tot = kl_tot = 0.0
        mb = cfg.micro_batch_size * (len(seqs) // per_step)  # "both" doubles the rollouts
        for i in range(0, len(seqs), mb):
            ids, labels = pack_sequences(seqs[i:i + mb], tokenizer.pad_token_id)
            loss, kl, _ = jsd_on_sequences(student, teacher, ids.to(env.device),
                                           labels.to(env.device), cfg.beta, cfg.temperature,
                                           cfg.chunk_size, _autocast(cfg, env))
            (loss / n).backward()
            loss_tot += float(loss.detach())
            kl_tot += kl
        update_s = time.perf_counter() - t1
        return loss_tot / n, {"kl": kl_tot / n, "response_length": n / len(seqs),
                              "on_policy": int(on_policy), "rollout_s": rollout_s,
                              "update_s": update_s, "targets": n}

    return train_loop(cfg, env, student, tokenizer, state, step_fn)


__all__ = ["PromptSampler", "jsd_on_sequences", "pack_sequences", "rollout", "rollout_modes",
           "run_on_policy"]
