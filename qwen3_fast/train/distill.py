"""Strong-to-weak distillation (Qwen3's route to its small models): ``qwen3-fast train distill``.

Stages (``STAGES``; each writes the student to ``<output_dir>/model`` with the tokenizer, so
the off-policy output is the on-policy stage's ``model.init_from``):

off_policy
    1. The teacher (``teacher``: a checkpoint directory) answers every prompt of
       ``data.sources`` (RL-prompt JSONL) in each mode of ``modes`` (thinking and
       non-thinking by default; a prompt that fixes its mode by a /think or /no_think flag or
       ``enable_thinking`` gets only that one with ``respect_prompt_mode``), batched through
       the engine (``LLM.from_model``), written as chat samples to
       ``<output_dir>/teacher_data.jsonl`` (distill_data.py; resumable, reused when done).
    2. The student trains on them with the SFT machinery: sft_data's ChatPackedStream through
       the trainer core (loss on the reply tokens). With ``topk_kd = k > 0`` the teacher's
       top-k next-token log-probs of every reply token are stored too
       (``teacher_topk.jsonl``) and the loss per reply token becomes
       ``(1 - kd_alpha) * CE + kd_alpha * KD`` (KD: cross-entropy against the renormalized
       teacher top-k, distill_losses.py), averaged over the reply tokens of the step.
on_policy
    Each optimizer step the student samples completions of ``micro_batch_size *
    grad_accum`` prompts through ``LLM.from_model`` on its live weights; the teacher scores
    the same tokens (one no-grad forward, final hidden states only); the loss is the
    generalized JSD per completion token (``beta`` 0 = forward KL(T||S), 1 = reverse
    KL(S||T); both at ``temperature``) from ``ops.linear_jsd``, so neither model's [T, V]
    logits exist, averaged over the completion tokens of the step (prompt and padding rows
    masked). With ``lambda_on_policy < 1`` a step is, with probability 1 - lambda, a batch
    of chat samples from ``off_policy_data`` instead (GKD's mixing), scored the same way.
    Metrics (metrics.jsonl): loss, kl (the exact KL(S||T) at temperature 1 on the sampled
    positions), response_length, rollout_s, update_s, lr, grad_norm.

Teacher and student must share a tokenizer (same vocabulary, merges and special tokens, and
the same config vocab_size): :func:`check_shared_tokenizer` refuses otherwise. Both stages
resume from ``<output_dir>/checkpoints`` (train/checkpoint.py). The KD and on-policy loops
run on one process (a ValueError under torchrun); plain off-policy training uses FSDP like
pre-training, with rank 0 generating the data.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from qwen3_fast.train.config import ConfigError, SourceConfig, TrainConfig
from qwen3_fast.train.data import IGNORE_INDEX, load_tokenizer
from qwen3_fast.train.distill_data import MODES

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class SamplingConfig:
    """Engine sampling for the generations (None: the engine's Qwen3 mode defaults)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    max_new_tokens: Optional[int] = 512

    def params(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DistillConfig(TrainConfig):
    """What both stages share: the teacher and the engine limits."""

    teacher: str = ""  # the teacher's checkpoint directory (with its tokenizer)
    teacher_dtype: Optional[str] = None  # float32 | bfloat16; None: as stored
    gen_batch_size: int = 16  # sequences the engine decodes together
    max_seq_len: int = 4096  # engine cache length: prompt + reply
    chunk_size: Optional[int] = None  # rows per chunk of the fused losses (None: auto)

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ConfigError("teacher: expected the teacher's checkpoint directory, got ''")
        if self.teacher_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"teacher_dtype: expected float32, bfloat16 or null, got "
                              f"{self.teacher_dtype!r}")
        for key in ("gen_batch_size", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an int >= 1, got {getattr(self, key)}")


@dataclass
class OffPolicyConfig(DistillConfig):
    stage: str = "off_policy"
    output_dir: str = "runs/distill_off_policy"
    modes: list[str] = field(default_factory=lambda: ["thinking", "non_thinking"])
    respect_prompt_mode: bool = True  # a prompt's /think, /no_think or enable_thinking wins
    samples_per_prompt: int = 1  # teacher replies per prompt and mode
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    keep_truncated: bool = False  # keep replies cut by max_new_tokens
    topk_kd: int = 0  # k of the top-k teacher-logit KD; 0 = off (plain SFT on the samples)
    kd_alpha: float = 0.5  # loss = (1 - kd_alpha) * CE + kd_alpha * KD
    overlong: str = "drop"  # samples longer than data.seq_len: drop | truncate (SFT stream)

    def validate(self) -> None:
        super().validate()
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ConfigError(f"modes: expected a non-empty list of thinking / non_thinking, "
                              f"got {self.modes!r}")
        checks = [(self.samples_per_prompt >= 1, "samples_per_prompt", "an int >= 1"),
                  (self.topk_kd >= 0, "topk_kd", "an int >= 0 (0 = off)"),
                  (0.0 <= self.kd_alpha <= 1.0, "kd_alpha", "in [0, 1]"),
                  (self.overlong in ("drop", "truncate"), "overlong", "'drop' or 'truncate'")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: expected {expected}, got {getattr(self, key)!r}")

    def build_stream(self, tokenizer):
        """The SFT chat packing over ``data.sources`` (run() points them at the teacher's
        samples before training)."""
        from qwen3_fast.train.sft_data import ChatPackedStream

        return ChatPackedStream(self.data, tokenizer, overlong=self.overlong)


def _on_policy_sampling() -> SamplingConfig:
    # the student's own distribution: no temperature change, no truncation, no penalty
    return SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                          presence_penalty=0.0, max_new_tokens=256)


@dataclass
class OnPolicyConfig(DistillConfig):
    stage: str = "on_policy"
    output_dir: str = "runs/distill_on_policy"
    beta: float = 0.5  # generalized JSD: 0 forward KL(T||S), 1 reverse KL(S||T)
    temperature: float = 1.0  # of both distributions in the loss
    mode: str = "prompt"  # prompt (its flag / field; thinking when open) | thinking |
    #                       non_thinking | both (each prompt rolled out in both modes)
    sampling: SamplingConfig = field(default_factory=_on_policy_sampling)
    lambda_on_policy: float = 1.0  # fraction of steps on student samples (GKD's lambda)
    off_policy_data: str = ""  # chat-sample JSONL for the other steps (e.g. teacher_data)

    def validate(self) -> None:
        super().validate()
        checks = [(0.0 <= self.beta <= 1.0, "beta", "in [0, 1]"),
                  (self.temperature > 0, "temperature", "> 0"),
                  (self.mode in ("prompt", "thinking", "non_thinking", "both"), "mode",
                   "prompt, thinking, non_thinking or both"),
                  (0.0 <= self.lambda_on_policy <= 1.0, "lambda_on_policy", "in [0, 1]"),
                  (self.lambda_on_policy == 1.0 or bool(self.off_policy_data),
                   "off_policy_data", "a chat-sample JSONL when lambda_on_policy < 1")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: expected {expected}, got {getattr(self, key)!r}")


STAGES = {"off_policy": OffPolicyConfig, "on_policy": OnPolicyConfig}


# ------------------------------------------------------------------ the shared tokenizer
def _added_tokens(tok) -> dict:
    return {i: (t.content, t.special)
            for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items()}


def _merges(tok) -> list:
    return json.loads(tok.backend_tokenizer.to_str()).get("model", {}).get("merges", [])


def check_shared_tokenizer(student_tok, teacher_tok, student_vocab_size: Optional[int] = None,
                           teacher_vocab_size: Optional[int] = None) -> None:
    """Raise ValueError saying what differs unless both tokenizers (and the models' config
    vocab_size, when given) are the same: vocabulary, merges, special tokens, eos / pad."""
    problems = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])[:5]
        problems.append(f"vocabularies differ (student {len(sv)} tokens, teacher {len(tv)}; "
                        f"only in the student: {only_s}, only in the teacher: {only_t}, other "
                        f"ids: {moved})")
    elif _merges(student_tok) != _merges(teacher_tok):
        problems.append("BPE merges differ (the same text tokenizes differently)")
    sa, ta = _added_tokens(student_tok), _added_tokens(teacher_tok)
    if sa != ta:
        diff = sorted(set(sa.items()) ^ set(ta.items()))[:5]
        problems.append(f"special/added tokens differ ({diff})")
    for name in ("eos_token", "pad_token"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            problems.append(f"{name} differs (student {getattr(student_tok, name)!r}, teacher "
                            f"{getattr(teacher_tok, name)!r})")
    if student_vocab_size is not None and teacher_vocab_size is not None and \
            student_vocab_size != teacher_vocab_size:
        problems.append(f"config vocab_size differs (student {student_vocab_size}, teacher "
                        f"{teacher_vocab_size})")
    if problems:
        raise ValueError("teacher and student must share a tokenizer: " + "; ".join(problems))


def student_tokenizer_spec(cfg: DistillConfig) -> str:
    """data.tokenizer when set, else the student checkpoint's own, else the teacher's."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.init_from and os.path.isfile(os.path.join(cfg.model.init_from, TOKENIZER_FILE)):
        return cfg.model.init_from
    return cfg.teacher


def student_vocab_size(cfg: DistillConfig) -> int:
    from qwen3_fast.model.config import Qwen3Config

    if "vocab_size" in cfg.model.overrides:
        return int(cfg.model.overrides["vocab_size"])
    if cfg.model.init_from:
        return Qwen3Config.from_pretrained(cfg.model.init_from).vocab_size
    return Qwen3Config.from_name(cfg.model.name, **cfg.model.overrides).vocab_size


def load_teacher(cfg: DistillConfig, device: torch.device):
    """(teacher model in eval mode without gradients, its tokenizer), after checking the
    student shares the tokenizer; also returns the student's tokenizer spec."""
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config
    from qwen3_fast.tokenizer import Qwen3Tokenizer

    if not os.path.isdir(cfg.teacher):
        raise FileNotFoundError(f"teacher: {cfg.teacher!r} is not a checkpoint directory")
    teacher_tok = Qwen3Tokenizer.from_pretrained(cfg.teacher)
    spec = student_tokenizer_spec(cfg)
    check_shared_tokenizer(load_tokenizer(spec), teacher_tok, student_vocab_size(cfg),
                           Qwen3Config.from_pretrained(cfg.teacher).vocab_size)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.teacher_dtype)
    teacher = Qwen3ForCausalLM.from_pretrained(cfg.teacher, dtype=dtype, device=device)
    teacher.eval().requires_grad_(False)
    return teacher, teacher_tok, spec


# ------------------------------------------------------------------ the step loop
def train_loop(cfg: DistillConfig, env, model, tokenizer, data,
               step_fn: Callable[[int], tuple[float, dict]]) -> list[float]:
    """AdamW over `model` and the shared step loop (train/loop.py) around `step_fn` (one
    optimizer step's forward/backward: returns (loss, extra metrics)). `data` has
    state_dict / load_state_dict (saved with each checkpoint)."""
    from qwen3_fast.train.loop import run_steps
    from qwen3_fast.train.optim import build_optimizer

    model.train()
    optimizer = build_optimizer(model, cfg.optim, env.device, env.distributed)
    return run_steps(cfg, env, model, optimizer, tokenizer, data, step_fn,
                     desc=f"distill {cfg.stage}")


def _single_process(env, what: str) -> None:
    if env.distributed:
        raise ValueError(f"{what} runs on one process; start it without torchrun")


def _autocast(cfg: TrainConfig, env):
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, S] -> the label each hidden row predicts (row t: labels[t + 1])."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


# ------------------------------------------------------------------ off-policy
def run_off_policy(cfg: OffPolicyConfig, env) -> list[float]:
    from qwen3_fast.generate import LLM
    from qwen3_fast.generate.params import load_generation_config
    from qwen3_fast.train.distill_data import annotate_topk, generate_teacher_data, load_prompts
    from qwen3_fast.train.distributed import barrier
    from qwen3_fast.train.trainer import build_model, seed_everything, train

    if cfg.topk_kd:
        _single_process(env, "off-policy distillation with topk_kd")
    os.makedirs(cfg.output_dir, exist_ok=True)
    data_path = os.path.join(cfg.output_dir, "teacher_data.jsonl")
    topk_path = os.path.join(cfg.output_dir, "teacher_topk.jsonl")
    teacher, teacher_tok, spec = load_teacher(cfg, env.device)
    if env.is_main:
        prompts = load_prompts([s.path for s in cfg.data.sources])
        engine = LLM.from_model(teacher, teacher_tok, load_generation_config(cfg.teacher),
                                max_batch_size=cfg.gen_batch_size, max_seq_len=cfg.max_seq_len)
        settings = {"teacher": os.path.abspath(cfg.teacher), "modes": list(cfg.modes),
                    "respect_prompt_mode": cfg.respect_prompt_mode,
                    "samples_per_prompt": cfg.samples_per_prompt,
                    "sampling": cfg.sampling.params(), "seed": cfg.seed,
                    "keep_truncated": cfg.keep_truncated, "prompts": len(prompts)}
        generate_teacher_data(engine, prompts, data_path, cfg.modes, cfg.respect_prompt_mode,
                              cfg.samples_per_prompt, cfg.sampling.params(), cfg.seed,
                              cfg.gen_batch_size, cfg.keep_truncated, settings)
        if cfg.topk_kd:
            annotate_topk(teacher, teacher_tok, data_path, topk_path, cfg.topk_kd,
                          cfg.gen_batch_size, cfg.chunk_size)
    barrier(env)
    del teacher
    sft_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer=spec,
        sources=[SourceConfig(path=data_path, kind="jsonl", messages_field="messages")]))
    if not cfg.topk_kd:
        return train(sft_cfg, env)  # the trainer core over sft_data's chat packing

    from qwen3_fast.train.distill_data import KDPackedStream
    from qwen3_fast.train.distill_losses import topk_kd_loss

    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(spec)
    model = build_model(sft_cfg, env.device)
    stream = KDPackedStream(data_path, topk_path, tokenizer, cfg.data.seq_len, cfg.topk_kd,
                            cfg.data.seed)
    alpha = cfg.kd_alpha

    def step_fn(step: int):
        rows = [stream.next_row() for _ in range(cfg.micro_batch_size * cfg.grad_accum)]
        n = max(1, sum(sum(1 for y in r["labels"][1:] if y != IGNORE_INDEX) for r in rows))
        ce_tot = kd_tot = 0.0
        for i in range(cfg.grad_accum):
            part = rows[i * cfg.micro_batch_size:(i + 1) * cfg.micro_batch_size]
            b = {k: torch.tensor([r[k] for r in part], device=env.device,
                                 dtype=torch.float32 if k == "kd_logprobs" else torch.long)
                 for k in part[0]}
            with _autocast(cfg, env):
                out = model(b["input_ids"], position_ids=b["position_ids"],
                            document_ids=b["document_ids"], labels=b["labels"],
                            return_logits=False, loss_reduction="sum")
            mask = (shift_labels(b["labels"]) != IGNORE_INDEX).reshape(-1)
            hidden = out.hidden_states.reshape(mask.shape[0], -1)
            kd = topk_kd_loss(hidden, model.lm_head.weight, b["kd_ids"].reshape(mask.shape[0], -1),
                              b["kd_logprobs"].reshape(mask.shape[0], -1), mask, cfg.chunk_size)
            (((1 - alpha) * out.loss.float() + alpha * kd) / n).backward()
            ce_tot += float(out.loss.detach())
            kd_tot += float(kd.detach())
        return ((1 - alpha) * ce_tot + alpha * kd_tot) / n, {"ce": ce_tot / n, "kd": kd_tot / n,
                                                             "targets": n}

    return train_loop(cfg, env, model, tokenizer, stream, step_fn)


def run(cfg: DistillConfig, env=None) -> list[float]:
    """The recipe entry (train/recipes.py): run stage `cfg` and return its per-step losses."""
    from qwen3_fast.train.distributed import init_distributed

    cfg.validate()
    env = env or init_distributed(cfg.device)
    if isinstance(cfg, OffPolicyConfig):
        return run_off_policy(cfg, env)
    if isinstance(cfg, OnPolicyConfig):
        from qwen3_fast.train.distill_on_policy import run_on_policy

        return run_on_policy(cfg, env)
    raise TypeError(f"expected an OffPolicyConfig or OnPolicyConfig, got {type(cfg).__name__}")


__all__ = ["DistillConfig", "OffPolicyConfig", "OnPolicyConfig", "STAGES", "SamplingConfig",
           "check_shared_tokenizer", "load_teacher", "run", "run_off_policy", "shift_labels",
           "student_tokenizer_spec", "train_loop"]
