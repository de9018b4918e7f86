"""Supervised fine-tuning: Qwen3's long-CoT cold start (post-training stage 1) and
thinking-mode fusion (stage 3), both on the trainer core (train/trainer.py ``train``).

The SFT configs differ from pre-training only in their data and defaults: ``build_stream``
returns a :class:`~qwen3_fast.train.sft_data.ChatPackedStream` (chat samples rendered in our
Qwen3 chat format, whole samples packed into ``data.seq_len`` rows, loss on the final
assistant reply only: its ``<think>`` block, answer and ``<|im_end|>``), and the schedule is
a short warmup plus cosine decay at a fine-tuning lr. Everything else (AdamW, bf16,
accumulation, FSDP2, atomic checkpoints and exact resume, metrics) is the trainer core's.

    cold_start  ColdStartConfig  long-CoT samples (verified reasoning traces), few steps
    fusion      FusionConfig     thinking + non-thinking mix with /think and /no_think flags

Commands (tiny recipes: CPU, seconds; the real ones point ``model.init_from`` at the
previous stage's ``<output_dir>/model``):

    qwen3-fast train sft --config recipes/sft_cold_start_tiny.yaml
    qwen3-fast train sft --config recipes/sft_cold_start_tiny.yaml \\
        model.init_from=runs/s1_tiny/model data.tokenizer=runs/s1_tiny/model
    qwen3-fast train sft --config recipes/sft_fusion_tiny.yaml \\
        model.init_from=runs/sft_cold_start_tiny/model
    torchrun --nproc-per-node 8 -m qwen3_fast.train sft --config my_cold_start.yaml

The fusion data is a prebuilt JSONL (train/fusion.py):

    python -m qwen3_fast.train.fusion --thinking think.jsonl --non-thinking plain.jsonl \\
        --out fusion_mix.jsonl --seed 0

We build the mix offline rather than on the fly: the mix is then a dataset that can be
inspected, deduplicated and reused, its ratios are exact over the whole set (not only in
expectation), and training reads it through the same resumable chat stream as any SFT data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qwen3_fast.train.config import ConfigError, TrainConfig


@dataclass
class SFTConfig(TrainConfig):
    """The fields both SFT stages share (their defaults differ)."""

    stage: str = "cold_start"
    output_dir: str = "runs/sft"
    # samples longer than data.seq_len: "drop" (counted, warned) or "truncate" (cut at
    # seq_len, which can cut the answer and its <|im_end|>: only for data known to be clean)
    overlong: str = "drop"

    DEFAULTS = {"data": {"seq_len": 8192},
                "optim": {"schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1,
                          "lr": 2e-5, "weight_decay": 0.01}}

    def build_stream(self, tokenizer):
        from qwen3_fast.train.sft_data import ChatPackedStream

        return ChatPackedStream(self.data, tokenizer, overlong=self.overlong)

    def validate(self) -> None:
        super().validate()
        if self.overlong not in ("drop", "truncate"):
            raise ConfigError(f"overlong: expected 'drop' or 'truncate', got {self.overlong!r}")
        if self.data.length_mix:
            raise ConfigError("data.length_mix: not used by SFT (whole chat samples are "
                              "packed); expected an empty list")


@dataclass
class ColdStartConfig(SFTConfig):
    """Long-CoT cold start: a small set of verified reasoning traces (every reply has a
    think block), a few hundred steps at a low lr, from the pre-trained base model."""

    stage: str = "cold_start"
    output_dir: str = "runs/sft_cold_start"
    steps: int = 300
    save_every: int = 100


@dataclass
class FusionConfig(SFTConfig):
    """Thinking-mode fusion: continual SFT of the reasoning-RL model on a prebuilt mix of
    thinking and non-thinking samples (train/fusion.py), so one model serves both modes and
    follows /think and /no_think. A lower lr than the cold start (it refines an RL model)."""

    stage: str = "fusion"
    output_dir: str = "runs/sft_fusion"
    steps: int = 1000
    save_every: int = 250

    DEFAULTS = {"data": {"seq_len": 8192},
                "optim": {"schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1,
                          "lr": 1e-5, "weight_decay": 0.01}}


STAGES = {"cold_start": ColdStartConfig, "fusion": FusionConfig}


def run(cfg: SFTConfig, env: Optional[object] = None) -> list[float]:
    """The recipe entry (train/recipes.py): the trainer core on the config's chat stream."""
    from qwen3_fast.train.trainer import train

    return train(cfg, env)


__all__ = ["ColdStartConfig", "FusionConfig", "SFTConfig", "STAGES", "run"]
