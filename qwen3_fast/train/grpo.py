"""GRPO: reasoning RL and general RL (``qwen3-fast train grpo --config FILE``).

One optimizer step of :func:`run`:

1. rollout: ``rollout.prompts_per_step`` prompt records (train/rl_prompts.py), each rendered
   with our Qwen3 chat template in its own mode (``enable_thinking``) and sampled
   ``rollout.num_generations`` (G) times by the engine over the live policy
   (``LLM.from_model``; batched; each request seeded from (seed, step, index), so a resumed
   run samples the same completions);
2. scoring: the config's rewards (train/rewards.py; per-task selection, weights), then
   advantages normalized per group, per batch or not at all (train/rl_losses.py);
3. update: one no-grad pass gives the old log-probs, the batch entropy H_k (for the entropy
   controller) and, with ``loss.beta > 0``, the frozen reference's log-probs (with one PPO
   epoch and no entropy control the policy's part is skipped: the update's own detached
   log-probs are the old ones); then
   ``loss.ppo_epochs`` passes, each one AdamW step over the whole batch in micro-batches of
   ``micro_batch_size`` sequences: loss = clipped policy loss + beta * k3 KL - alpha_k * H,
   normalized per ``loss.normalization`` (grpo, bnpo, dr_grpo, dapo).

Token log-probs and entropies come from ``ops.linear_logprobs`` on the completion rows of
the model's final hidden states, so no [T, V] logits tensor exists. Sequences are
right-padded and need no attention mask: under causal attention a real token never sees the
padding after it, and padded positions carry no loss.

Metrics (metrics.jsonl): reward (mean and per reward), accuracy, entropy, entropy_coef
(alpha_k) and entropy_c (c_{k+1}), kl, clip_low / clip_high, response_length, truncated,
loss, grad_norm, lr, rollout_s / scoring_s / update_s. Checkpoints hold the prompt
position and the entropy controller; the finished model goes to ``<output_dir>/model``.
Single process only (the engine needs the whole model on one device).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwen3_fast.train.config import ConfigError, TrainConfig, _get
from qwen3_fast.train.rewards import REWARD_NAMES, RewardSpec
from qwen3_fast.train.rl_losses import ADVANTAGE_MODES, NORMALIZATIONS


@dataclass
class RolloutConfig:
    prompts_per_step: int = 32
    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 1024  # also dr_grpo's max_completion_length
    max_prompt_len: int = 1024  # longer prompts are skipped (counted in the metrics)
    temperature: float = 1.0  # sampling and log-prob temperature
    top_p: float = 1.0
    top_k: int = 0
    engine_batch_size: int = 64  # sequences the engine decodes together
    kv_cache: str = "bf16"  # bf16 | int8


@dataclass
class LossConfig:
    advantage: str = "group"  # group | batch | none
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO's clip-higher
    beta: float = 0.0  # k3 KL to the frozen initial policy; 0: no reference model
    normalization: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    ppo_epochs: int = 1  # optimizer steps per rollout batch


@dataclass
class EntropyConfig:
    """Skywork-OR1 adaptive entropy bonus (rl_losses.EntropyController)."""

    control: bool = True  # false: no entropy bonus
    target: float = 0.2  # nats per token
    delta: float = 0.005
    init: float = 0.0
    min: float = 0.0
    max: float = 0.05


@dataclass
class GRPOConfig(TrainConfig):
    """Fields shared by both GRPO stages. TrainConfig's micro_batch_size = sequences per
    micro-batch of the update; grad_accum must stay 1 (each optimizer step covers the
    whole rollout batch); data.sources are JSONL prompt files (their weights are the task
    mix); data.seq_len is not used (rollout.max_prompt_len + max_new_tokens bound a
    sequence)."""

    stage: str = "reasoning_rl"
    output_dir: str = "runs/grpo"
    steps: int = 100
    save_every: int = 20
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    rewards: list[RewardSpec] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        r, lo, e = self.rollout, self.loss, self.entropy
        checks = [
            (r.prompts_per_step >= 1, "rollout.prompts_per_step", "an int >= 1"),
            (r.num_generations >= 2, "rollout.num_generations", "an int >= 2 (a group)"),
            (r.max_new_tokens >= 1, "rollout.max_new_tokens", "an int >= 1"),
            (r.max_prompt_len >= 1, "rollout.max_prompt_len", "an int >= 1"),
            (r.temperature > 0, "rollout.temperature", "> 0 (log-probs divide by it)"),
            (0 < r.top_p <= 1, "rollout.top_p", "in (0, 1]"),
            (r.top_k >= 0, "rollout.top_k", ">= 0"),
            (r.engine_batch_size >= 1, "rollout.engine_batch_size", "an int >= 1"),
            (r.kv_cache in ("bf16", "int8"), "rollout.kv_cache", "'bf16' or 'int8'"),
            (lo.advantage in ADVANTAGE_MODES, "loss.advantage", " | ".join(ADVANTAGE_MODES)),
            (lo.normalization in NORMALIZATIONS, "loss.normalization",
             " | ".join(NORMALIZATIONS)),
            (0 <= lo.eps_low < 1, "loss.eps_low", "in [0, 1)"),
            (lo.eps_high >= 0, "loss.eps_high", ">= 0"),
            (lo.beta >= 0, "loss.beta", ">= 0"),
            (lo.ppo_epochs >= 1, "loss.ppo_epochs", "an int >= 1"),
            (e.delta >= 0, "entropy.delta", ">= 0"),
            (0 <= e.min <= e.max, "entropy.min", "0 <= entropy.min <= entropy.max"),
            (bool(self.rewards), "rewards", "at least one reward"),
            (self.grad_accum == 1, "grad_accum", "1 (each optimizer step covers the whole "
             "rollout batch in micro-batches of micro_batch_size sequences)"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: expected {expected}, got {_get(self, key)!r}")
        for i, spec in enumerate(self.rewards):
            if spec.name not in REWARD_NAMES:
                raise ConfigError(f"rewards.{i}.name: expected one of "
                                  f"{', '.join(REWARD_NAMES)}, got {spec.name!r}")
            if spec.name == "callable" and not spec.function:
                raise ConfigError(f"rewards.{i}.function: a callable reward needs "
                                  "'module:function'")
            if spec.name == "reward_model" and not spec.path:
                raise ConfigError(f"rewards.{i}.path: a reward model needs a checkpoint "
                                  "directory")
            if spec.name == "judge" and not (spec.function or spec.path):
                raise ConfigError(f"rewards.{i}: a judge needs function or path")


_RL_OPTIM = {"lr": 1.0e-6, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
             "beta2": 0.999}


@dataclass
class ReasoningRLConfig(GRPOConfig):
    """Reasoning RL (Qwen3 stage 2): verifiable query-answer pairs, math-verify accuracy
    plus a small format reward, adaptive entropy control, constant learning rate."""

    stage: str = "reasoning_rl"
    output_dir: str = "runs/reasoning_rl"
    DEFAULTS = {"optim": _RL_OPTIM,
                "rewards": [{"name": "math"}, {"name": "format", "weight": 0.1}]}


@dataclass
class GeneralRLConfig(GRPOConfig):
    """General RL (Qwen3 stage 4): a task mix (the data sources' weights; each record's
    "task") with reward types chosen per task (rewards.N.tasks): rule-based, a
    reference-answer judge callable, a reward model, and instruction/mode following."""

    stage: str = "general_rl"
    output_dir: str = "runs/general_rl"
    DEFAULTS = {"optim": _RL_OPTIM, "entropy": {"control": False}}

    def validate(self) -> None:
        super().validate()
        if not any(spec.tasks for spec in self.rewards):
            raise ConfigError("rewards: general RL mixes reward types per task; expected at "
                              "least one reward with a 'tasks' list")


STAGES = {"reasoning_rl": ReasoningRLConfig, "general_rl": GeneralRLConfig}


def run(cfg: GRPOConfig, env=None) -> list[float]:
    """Run (or resume) GRPO; returns this run's per-step losses."""
    from qwen3_fast.train.grpo_step import GRPOTrainer

    return GRPOTrainer(cfg, env).train()


__all__ = ["EntropyConfig", "GRPOConfig", "GeneralRLConfig", "LossConfig",
           "ReasoningRLConfig", "RolloutConfig", "STAGES", "run"]
