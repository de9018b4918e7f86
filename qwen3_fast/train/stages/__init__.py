"""The Qwen3 pre-training stages: one config dataclass each, all run by train/trainer.py.

    s1  general    S1GeneralConfig       seq 4096, cosine decay, RoPE base 1e4
    s2  reasoning  S2ReasoningConfig     reasoning-heavy mix (checked), faster decay
    s3  long ctx   S3LongContextConfig   RoPE base 1e6 (ABF), seq 32768, 75%/25% length mix,
                                         activation checkpointing
"""
from qwen3_fast.train.stages.s1_general import S1GeneralConfig
from qwen3_fast.train.stages.s2_reasoning import S2ReasoningConfig
from qwen3_fast.train.stages.s3_long_context import S3LongContextConfig

STAGES = {"s1": S1GeneralConfig, "s2": S2ReasoningConfig, "s3": S3LongContextConfig}


def run(cfg, env=None) -> list[float]:
    """The recipe entry (train/recipes.py): every pre-training stage runs the trainer core."""
    from qwen3_fast.train.trainer import train

    return train(cfg, env)


__all__ = ["S1GeneralConfig", "S2ReasoningConfig", "S3LongContextConfig", "STAGES", "run"]
