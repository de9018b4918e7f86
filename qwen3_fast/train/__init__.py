"""qwen3_fast.train: the trainer core and the Qwen3 pre-training stages (S1, S2, S3).

    qwen3-fast train pretrain --config recipes/s1_tiny.yaml [key=value ...]
    torchrun --nproc-per-node 2 -m qwen3_fast.train --config recipes/s1_tiny.yaml

Modules: config (dataclasses, YAML, overrides), data (sources, mixing, packing), optim
(AdamW, schedules), trainer (the loop), checkpoint (atomic, resumable, reshardable),
distributed (torchrun + FSDP2), losses (MoE balance loss), stages/ (S1, S2, S3).
"""
from qwen3_fast.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "main", "train"]


def train(cfg, env=None):
    from qwen3_fast.train.trainer import train as _train

    return _train(cfg, env)


def main(argv=None) -> int:
    from qwen3_fast.train.__main__ import main as _main

    return _main(argv)
