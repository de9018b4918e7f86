"""Stage S2, reasoning (Qwen3 report: ~5T tokens with more STEM, coding, reasoning and
synthetic data, and a faster learning-rate decay).

The mix is checked: sources whose ``domain`` is reasoning / code / math / stem must carry
at least ``min_reasoning_share`` of the total source weight. The schedule defaults to no
warmup (the run continues S1's model, ``model.init_from``) and a cosine decay to 1% of the
peak over the (much shorter) stage, i.e. a faster decay than S1's.

    qwen3-fast train pretrain --config recipes/s2_tiny.yaml
    torchrun --nproc-per-node 8 -m qwen3_fast.train --config recipes/s2_reasoning.yaml \\
        model.init_from=runs/s1/model
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen3_fast.train.config import ConfigError, TrainConfig

REASONING_DOMAINS = ("reasoning", "code", "math", "stem")


@dataclass
class S2ReasoningConfig(TrainConfig):
    stage: str = "s2"
    rope_theta: float = 10000.0
    min_reasoning_share: float = 0.5

    DEFAULTS = {"data": {"seq_len": 4096},
                "optim": {"schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.01}}

    def stage_model_overrides(self) -> dict:
        return {"rope_theta": self.rope_theta}

    def reasoning_share(self) -> float:
        total = sum(s.weight for s in self.data.sources)
        heavy = sum(s.weight for s in self.data.sources if s.domain in REASONING_DOMAINS)
        return heavy / total if total else 0.0

    def validate(self) -> None:
        super().validate()
        share = self.reasoning_share()
        if share < self.min_reasoning_share:
            raise ConfigError(
                f"data.sources: S2 needs a reasoning-heavy mix; sources with domain in "
                f"{REASONING_DOMAINS} carry {share:.0%} of the weight, expected at least "
                f"{self.min_reasoning_share:.0%} (min_reasoning_share)")
