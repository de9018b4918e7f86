"""train/config.py and train/optim.py: YAML + overrides into typed stage dataclasses; schedules."""
from __future__ import annotations

import pytest

from qwen3_fast.train.config import (ConfigError, LengthBucket, OptimConfig, apply_overrides,
                                     load_config)
from qwen3_fast.train.optim import lr_at
from qwen3_fast.train.stages import S1GeneralConfig, S2ReasoningConfig, S3LongContextConfig

from train_testlib import RECIPES

SRC = "data.sources=[{path: a.jsonl}]"


def test_yaml_and_typed_dotted_overrides():
    cfg = load_config(str(RECIPES / "s1_tiny.yaml"),
                      ["optim.lr=1e-2", "steps=7", "data.sources.1.weight=5",
                       "model.overrides.num_hidden_layers=1", "activation_checkpointing=true"])
    assert isinstance(cfg, S1GeneralConfig)
    assert cfg.optim.lr == 1e-2 and isinstance(cfg.optim.lr, float)
    assert cfg.steps == 7 and cfg.data.sources[1].weight == 5.0
    assert cfg.model.overrides["num_hidden_layers"] == 1 and cfg.activation_checkpointing
    assert cfg.data.sources[0].path.startswith(str(RECIPES))  # relative to the YAML file


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", r"unknown key 'optim.lrr' \(OptimConfig has: lr, "),
    ("steps=abc", "steps: expected an int, got 'abc'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("activation_checkpointing=3", "activation_checkpointing: expected true or false"),
    ("data.sources.5.weight=1", "'5' is not an index of the 1-item list data.sources"),
    ("steps", "expected key=value"),
    ("precision=fp8", "precision: expected 'bf16' or 'fp32', got 'fp8'"),
    ("stage=s9", "stage: expected one of s1, s2, s3"),
    ("data.length_mix=[{min_tokens: 9, max_tokens: 3}]", "data.length_mix.0"),
])
def test_bad_keys_and_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [SRC, override])


def test_stage_defaults():
    s1 = load_config(None, [SRC])
    assert isinstance(s1, S1GeneralConfig) and s1.data.seq_len == 4096
    assert s1.stage_model_overrides() == {"rope_theta": 1e4}
    s3 = load_config(None, ["stage=s3", SRC, "data.seq_len=16384"])
    assert isinstance(s3, S3LongContextConfig) and s3.activation_checkpointing
    assert s3.data.seq_len == 16384  # the user's value over the stage default 32768
    assert s3.data.length_mix == [LengthBucket(16384, 32769, 0.75), LengthBucket(4096, 16384, 0.25)]
    assert s3.stage_model_overrides() == {"rope_theta": 1e6, "max_position_embeddings": 32768}
    s2 = load_config(None, ["stage=s2", "data.sources=[{path: a.jsonl, domain: math}]"])
    assert isinstance(s2, S2ReasoningConfig) and s2.optim.min_lr_ratio < s1.optim.min_lr_ratio


def test_s2_rejects_a_general_heavy_mix():
    with pytest.raises(ConfigError, match="reasoning-heavy mix.*carry 25%"):
        load_config(None, ["stage=s2", "data.sources=[{path: a.jsonl, weight: 3}, "
                           "{path: b.jsonl, domain: code}]"])


def test_apply_overrides_creates_nested_maps():
    assert apply_overrides({}, ["a.b.c=1", "a.d=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}}


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, schedule="cosine")
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert abs(lrs[-1] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert abs(lr_at(4 + 15 // 2, 20, cfg) - (0.1 + 0.45 * (1 + __import__("math").cos(
        __import__("math").pi * 7 / 15)))) < 1e-12


def test_wsd_schedule():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=2, schedule="wsd",
                      decay_fraction=0.25)
    lrs = [lr_at(s, 16, cfg) for s in range(16)]
    assert lrs[:2] == [1.0, 2.0] and lrs[2:12] == [2.0] * 10
    assert lrs[12:] == [1.5, 1.0, 0.5, 0.0]
