"""The training recipes behind ``qwen3-fast train <recipe>``: one registry, looked up lazily.

Each recipe module exposes ``STAGES`` (stage name -> config dataclass; the first is the
default when a YAML file names none) and ``run(cfg, env) -> list[float]`` (per-step losses
of this run). Every config dataclass derives from train/config.py's ``TrainConfig`` and
every recipe writes its finished model (HF format, with the tokenizer) to
``<output_dir>/model``, where the next stage's ``model.init_from`` points.

    recipe     stages                     module
    pretrain   s1, s2, s3                 train/stages/ + train/trainer.py
    sft        cold_start, fusion         train/sft.py
    grpo       reasoning_rl, general_rl   train/grpo.py
    distill    off_policy, on_policy      train/distill.py
"""
from __future__ import annotations

import importlib

RECIPES = {
    "pretrain": ("qwen3_fast.train.stages", "pre-training S1 general / S2 reasoning / S3 long "
                 "context"),
    "sft": ("qwen3_fast.train.sft", "SFT: long-CoT cold start and thinking-mode fusion"),
    "grpo": ("qwen3_fast.train.grpo", "GRPO: reasoning RL and general RL"),
    "distill": ("qwen3_fast.train.distill", "strong-to-weak distillation: off-policy, "
                "on-policy"),
}


def recipe_module(name: str):
    """The module of recipe `name` (has STAGES and run)."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    return importlib.import_module(RECIPES[name][0])


__all__ = ["RECIPES", "recipe_module"]
