"""The GRPO loop behind train/grpo.py's ``run``: rollout, scoring and update of each step.

See train/grpo.py for the algorithm and the config; this module holds the machinery:
:class:`GRPOTrainer` (model, reference, optimizer, engine, prompts, rewards, entropy
controller, checkpoints) and :func:`token_logprobs` (the fused per-token log-probs and
entropies of a padded batch).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from qwen3_fast import ops
from qwen3_fast.train import rl_losses
from qwen3_fast.train.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint,
                                         save_hf_model)
from qwen3_fast.train.config import to_dict
from qwen3_fast.train.data import load_tokenizer
from qwen3_fast.train.distributed import init_distributed
from qwen3_fast.train.optim import build_optimizer, lr_at, set_lr
from qwen3_fast.train.rewards import RewardSet, sample_messages
from qwen3_fast.train.rl_prompts import PromptSource
from qwen3_fast.train.trainer import Metrics, build_model, seed_everything

IGNORE_INDEX = -100


@dataclass
class Rollout:
    """One step's sequences: prompt + completion ids, the samples they answer, the texts."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    samples: list[dict]
    truncated: list[bool]
    skipped_prompts: int = 0


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids [B, S]`` and next-token ``targets [B, S]``: targets[r, t] is
    ids[r, t+1] where that token is a completion token, IGNORE_INDEX elsewhere (prompt,
    the last position, padding)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    s = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), s), IGNORE_INDEX, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        seq = p + c
        ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        targets[r, len(p) - 1:len(seq) - 1] = torch.tensor(c, dtype=torch.long)
    return ids, targets


def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `targets` and entropies under `model`, both [B, S] fp32 (0
    where targets == IGNORE_INDEX). Only the scored rows of the final hidden states go
    through the fused LM head + log-softmax (ops.linear_logprobs): no [T, V] logits.

    The LM head runs in fp32 even under bf16 autocast: bf16 logits (8 significant bits,
    steps of 0.06 between 8 and 16) put up to ~0.1 nats of rounding into a token's
    log-prob (measured on the demo's teacher), which the PPO ratio exp(logp - old_logp)
    and the entropy would carry; the rollout engine samples from fp32 logits."""
    out = model(ids, return_logits=False)
    hidden = out.hidden_states  # [B, S, H]
    mask = targets != IGNORE_INDEX
    weight = model.lm_head.weight
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.autocast(hidden.device.type, enabled=False):
        lp, ent = ops.linear_logprobs(hidden[mask].to(acc), weight.to(acc), targets[mask],
                                      temperature=temperature, ignore_index=IGNORE_INDEX)
    full_lp = torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device)
    full_ent = torch.zeros(targets.shape, dtype=ent.dtype, device=ent.device)
    full_lp[mask] = lp
    full_ent[mask] = ent
    return full_lp, full_ent


class GRPOTrainer:
    """Everything one GRPO run holds (train/grpo.py documents the algorithm)."""

    def __init__(self, cfg, env=None):
        cfg.validate()
        self.cfg = cfg
        self.env = env or init_distributed(cfg.device)
        if self.env.distributed:
            raise ValueError("grpo: runs as a single process (the rollout engine needs the "
                             "whole policy on one device); launch without torchrun")
        dev = self.env.device
        seed_everything(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.policy = build_model(cfg, dev)
        if len(self.tokenizer) > self.policy.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {self.policy.config.vocab_size}")
        self.policy.train()
        # the frozen reference is the initial policy: copied before any checkpoint loads
        self.ref = None
        if cfg.loss.beta > 0:
            self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.optimizer = build_optimizer(self.policy, cfg.optim, dev)
        self.prompts = PromptSource(cfg.data.sources, cfg.data.seed)
        self.rewards = RewardSet(cfg.rewards, device=dev)
        e = cfg.entropy
        self.entropy = rl_losses.EntropyController(e.target, e.delta, e.init, e.min, e.max)
        r = cfg.rollout
        from qwen3_fast.generate.engine import LLM

        self.engine = LLM.from_model(self.policy, self.tokenizer, kv_cache=r.kv_cache,
                                     max_batch_size=r.engine_batch_size,
                                     max_seq_len=r.max_prompt_len + r.max_new_tokens)
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16,
                                       enabled=cfg.precision == "bf16")

    # ------------------------------------------------------------------ 1. rollout
    def prompt_ids(self, sample: dict) -> list[int]:
        return self.tokenizer.apply_chat_template(
            sample_messages(sample), add_generation_prompt=True,
            enable_thinking=bool(sample.get("enable_thinking", True)))

    def rollout(self, step: int) -> Rollout:
        from qwen3_fast.generate.params import SamplingParams

        r = self.cfg.rollout
        samples, prompt_ids, skipped = [], [], 0
        while len(samples) < r.prompts_per_step:
            sample = self.prompts.next()
            ids = self.prompt_ids(sample)
            if len(ids) > r.max_prompt_len:
                skipped += 1
                if skipped > 100 * r.prompts_per_step:
                    raise ValueError(f"rollout.max_prompt_len {r.max_prompt_len}: almost "
                                     "every prompt is longer")
                continue
            samples.append(sample)
            prompt_ids.append(ids)
        g = r.num_generations
        ids_all = [p for p in prompt_ids for _ in range(g)]
        samples_all = [s for s in samples for _ in range(g)]
        base = (self.cfg.seed * 1_000_003 + step) * 1_000_003
        params = [SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                 min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                                 repetition_penalty=1.0, max_new_tokens=r.max_new_tokens,
                                 seed=(base + i) % (1 << 62)) for i in range(len(ids_all))]
        outs = self.engine.generate(ids_all, sampling=params)
        return Rollout(prompt_ids=ids_all, completion_ids=[list(o.token_ids) for o in outs],
                       texts=[o.text for o in outs], samples=samples_all,
                       truncated=[o.finish_reason == "length" for o in outs],
                       skipped_prompts=skipped)

    # ------------------------------------------------------------------ 3. update
    def _micro_batches(self, ro: Rollout):
        mb = self.cfg.micro_batch_size
        dev = self.env.device
        for start in range(0, len(ro.prompt_ids), mb):
            ids, targets = pad_batch(ro.prompt_ids[start:start + mb],
                                     ro.completion_ids[start:start + mb],
                                     self.tokenizer.pad_token_id)
            yield start, ids.to(dev), targets.to(dev)

    def needs_old_pass(self) -> bool:
        """Whether the policy's no-grad pass must run before the update: several PPO
        epochs need the sampling policy's log-probs, entropy control needs H_k before the
        loss. Otherwise (one epoch, no controller) the update's own forward gives both: the
        old log-probs equal its detached log-probs (ratio 1), saving one forward."""
        return self.cfg.loss.ppo_epochs > 1 or self.cfg.entropy.control or self.force_old_pass

    force_old_pass = False  # tests: take the two-pass path even when one pass would do

    @torch.no_grad()
    def old_pass(self, ro: Rollout) -> tuple[list, list, Optional[float], Optional[float]]:
        """Old log-probs (None without the policy pass, see :meth:`needs_old_pass`) and the
        reference's per micro-batch; the batch's token-mean entropy and k3 KL to the
        reference under the pre-update policy (None when the update measures them)."""
        t = self.cfg.rollout.temperature
        policy = self.needs_old_pass()
        old, ref = [], []
        ent_sum = kl_sum = n = 0.0
        for _start, ids, targets in self._micro_batches(ro):
            mask = targets != IGNORE_INDEX
            with self.autocast:
                lp, ent = token_logprobs(self.policy, ids, targets, t) if policy else (None,
                                                                                       None)
                rlp = token_logprobs(self.ref, ids, targets, t)[0] if self.ref else None
            old.append(lp)
            ref.append(rlp)
            if not policy:
                continue
            ent_sum += float(ent[mask].sum())
            n += float(mask.sum())
            if rlp is not None:
                kl_sum += float(rl_losses.k3_kl(lp, rlp)[mask].sum())
        if not policy:
            return old, ref, None, None
        return old, ref, ent_sum / max(n, 1.0), kl_sum / max(n, 1.0)

    def update(self, ro: Rollout, advantages: torch.Tensor, alpha: float, old: list,
               ref: list) -> dict:
        cfg, lc = self.cfg, self.cfg.loss
        n_seq = len(ro.prompt_ids)
        n_tok = sum(len(c) for c in ro.completion_ids)
        n_micro = math.ceil(n_seq / cfg.micro_batch_size)
        adv = advantages.to(self.env.device)
        losses, norms = [], []
        clip_low = clip_high = ent_sum = kl_sum = 0.0
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        for _epoch in range(lc.ppo_epochs):
            total = 0.0
            for k, (start, ids, targets) in enumerate(self._micro_batches(ro)):
                mask = targets != IGNORE_INDEX
                with self.autocast:
                    lp, ent = token_logprobs(self.policy, ids, targets, cfg.rollout.temperature)
                a = adv[start:start + ids.shape[0]]
                old_lp = old[k] if old[k] is not None else lp.detach()
                per_tok, low, high = rl_losses.clipped_policy_loss(lp, old_lp, a, lc.eps_low,
                                                                   lc.eps_high)
                if ref[k] is not None:
                    kl = rl_losses.k3_kl(lp, ref[k])
                    per_tok = per_tok + lc.beta * kl
                    kl_sum += float(kl.detach()[mask].sum())
                ent_sum += float(ent.detach()[mask].sum())
                if alpha:
                    per_tok = per_tok - alpha * ent
                loss = rl_losses.aggregate(per_tok, mask, lc.normalization,
                                           num_sequences=n_seq, num_tokens=n_tok,
                                           max_completion_length=cfg.rollout.max_new_tokens,
                                           num_micro_batches=n_micro)
                loss.backward()
                total += float(loss.detach())
                clip_low += float((low & mask).sum())
                clip_high += float((high & mask).sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            norms.append(float(grad_norm))
        denom = max(n_tok * lc.ppo_epochs, 1)
        # entropy and KL per scored token (step() uses them with one epoch, whose forward
        # sees the pre-update policy)
        return {"loss": sum(losses) / len(losses), "grad_norm": norms[-1],
                "clip_low": clip_low / denom, "clip_high": clip_high / denom,
                "entropy": ent_sum / denom, "kl": kl_sum / denom}

    # ------------------------------------------------------------------ the loop
    def step(self, step: int) -> dict:
        """One GRPO step (rollout, scoring, update); returns its metrics record."""
        cfg = self.cfg
        lr = lr_at(step, cfg.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        t0 = time.perf_counter()
        ro = self.rollout(step)
        t1 = time.perf_counter()
        scores = self.rewards.score(ro.texts, ro.samples)
        rewards = torch.tensor(scores["total"], dtype=torch.float32)
        advantages = rl_losses.group_advantages(rewards, cfg.rollout.num_generations,
                                                cfg.loss.advantage)
        t2 = time.perf_counter()
        old, ref, entropy, kl = self.old_pass(ro)
        alpha = self.entropy.step(entropy) if cfg.entropy.control else 0.0
        upd = self.update(ro, advantages, alpha, old, ref)
        if entropy is None:  # one pass: the update's forward measured them
            entropy, kl = upd["entropy"], upd["kl"]
        t3 = time.perf_counter()
        acc = [a for a in scores["accuracy"] if not math.isnan(a)]
        record = {"step": step + 1, "loss": upd["loss"], "lr": lr,
                  "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                  **{f"reward/{k}": v for k, v in scores["per_reward"].items()},
                  "accuracy": sum(acc) / len(acc) if acc else None,
                  "entropy": entropy, "entropy_coef": alpha, "entropy_c": self.entropy.coef,
                  "kl": kl, "clip_low": upd["clip_low"], "clip_high": upd["clip_high"],
                  "clip_fraction": upd["clip_low"] + upd["clip_high"],
                  "grad_norm": upd["grad_norm"],
                  "response_length": sum(map(len, ro.completion_ids)) / len(ro.completion_ids),
                  "truncated": sum(ro.truncated) / len(ro.truncated),
                  "skipped_prompts": ro.skipped_prompts,
                  "rollout_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2,
                  "time": t3 - t0}
        return record

    def _save(self, done: int) -> None:
        save_checkpoint(self.cfg.output_dir, done, self.policy, self.optimizer,
                        {"data": self.prompts.state_dict(), "entropy": self.entropy.state_dict(),
                         "config": to_dict(self.cfg)}, self.env,
                        keep=self.cfg.keep_checkpoints)

    def train(self) -> list[float]:
        cfg = self.cfg
        start = 0
        ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.policy, self.optimizer, self.env)
            self.prompts.load_state_dict(state["data"])
            self.entropy.load_state_dict(state["entropy"])
            start = state["step"]
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        metrics = Metrics(cfg.output_dir, self.env)
        bar = None
        if cfg.progress and start < end:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=f"grpo {cfg.stage}", unit="step")
        losses: list[float] = []
        last_saved = start
        try:
            for step in range(start, end):
                record = self.step(step)
                losses.append(record["loss"])
                done = step + 1
                if done % cfg.log_every == 0 or done == end:
                    metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{record['reward']:.3f}",
                                    H=f"{record['entropy']:.3f}")
                if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                    self._save(done)
                    last_saved = done
            if end == cfg.steps and last_saved == cfg.steps:
                out = os.path.join(cfg.output_dir, "model")
                save_hf_model(self.policy, out, self.env)
                self.tokenizer.save_pretrained(out)
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        return losses


__all__ = ["GRPOTrainer", "Rollout", "pad_batch", "token_logprobs"]
