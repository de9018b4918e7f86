"""Stage S3, long context (Qwen3 report: RoPE base raised from 1e4 to 1e6 with ABF,
sequences up to 32768 tokens, 75% of the texts 16K-32K tokens long and 25% 4K-16K).

The model config written to every checkpoint carries ``rope_theta`` = 1e6 (and
``max_position_embeddings`` >= the sequence length), so the next stage and HF loaders see
the new base. Rows are 32768 packed tokens; ``data.length_mix`` draws documents by length
bucket with those weights; activation checkpointing is on (one 32K row of a 0.6B model
would otherwise keep ~50 GB of activations).

    qwen3-fast train pretrain --config recipes/s3_tiny.yaml
    torchrun --nproc-per-node 8 -m qwen3_fast.train --config recipes/s3_long_context.yaml \\
        model.init_from=runs/s2/model
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen3_fast.train.config import TrainConfig


@dataclass
class S3LongContextConfig(TrainConfig):
    stage: str = "s3"
    rope_theta: float = 1_000_000.0  # ABF: 1e4 -> 1e6
    activation_checkpointing: bool = True

    DEFAULTS = {"data": {"seq_len": 32768,
                         "length_mix": [
                             {"min_tokens": 16384, "max_tokens": 32769, "weight": 0.75},
                             {"min_tokens": 4096, "max_tokens": 16384, "weight": 0.25}]},
                "optim": {"schedule": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1}}

    def stage_model_overrides(self) -> dict:
        return {"rope_theta": self.rope_theta,
                "max_position_embeddings": max(32768, self.data.seq_len)}
