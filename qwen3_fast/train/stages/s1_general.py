"""Stage S1, general pre-training (Qwen3 report: > 30T tokens at sequence length 4096).

Next-token cross-entropy over a broad weighted mix of sources, rows of 4096 packed tokens,
linear warmup then cosine decay to 10% of the peak lr, RoPE base 1e4 (S3 raises it).

    qwen3-fast train pretrain --config recipes/s1_tiny.yaml
    torchrun --nproc-per-node 8 -m qwen3_fast.train --config recipes/s1_general.yaml
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen3_fast.train.config import TrainConfig


@dataclass
class S1GeneralConfig(TrainConfig):
    stage: str = "s1"
    rope_theta: float = 10000.0  # the RoPE base of S1/S2; S3 raises it (ABF)

    # nested defaults (merged under the YAML by load_config)
    DEFAULTS = {"data": {"seq_len": 4096},
                "optim": {"schedule": "cosine", "warmup_steps": 2000, "min_lr_ratio": 0.1}}

    def stage_model_overrides(self) -> dict:
        return {"rope_theta": self.rope_theta}
