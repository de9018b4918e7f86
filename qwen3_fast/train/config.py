"""Training configuration: dataclasses loaded from YAML with ``key=value`` overrides.

The trainer core reads :class:`TrainConfig`; each pre-training stage (train/stages/) is a
subclass with its own defaults. A YAML file names its stage (``stage: s1|s2|s3``) and gives
any subset of the fields; command-line overrides use dotted keys (``optim.lr=3e-4``,
``data.sources.0.weight=2``, ``model.overrides.num_hidden_layers=2``), values parsed as YAML
scalars and then checked against the dataclass field types. Unknown keys and ill-typed
values raise :class:`ConfigError` naming the dotted key and what was expected.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass."""


@dataclass
class ModelConfig:
    """Which model to train. ``init_from`` (an HF checkpoint directory, e.g. the previous
    stage's output) wins over ``name`` (a preset, "Qwen3-0.6B"); ``overrides`` are
    Qwen3Config fields applied on top (tiny test sizes, rope_theta, ...)."""

    name: Optional[str] = "Qwen3-0.6B"
    init_from: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"  # parameter (master) dtype: float32 or bfloat16


@dataclass
class SourceConfig:
    """One text source: a JSONL/Parquet file (or glob) or a ``datasets`` dataset.

    kind "auto" picks by suffix (.jsonl/.json, .parquet); "datasets" loads ``path`` with
    ``datasets.load_dataset(path, name, split=split)`` or ``load_from_disk`` when it is a
    directory saved by ``save_to_disk``."""

    path: str = ""
    kind: str = "auto"  # auto | jsonl | parquet | datasets
    weight: float = 1.0
    text_field: str = "text"
    # chat sources (SFT): the record field holding the `messages` list; None = text source
    messages_field: Optional[str] = None
    domain: str = "general"  # general | reasoning | code | math | stem (S2 checks the mix)
    name: Optional[str] = None  # datasets config name
    split: str = "train"


@dataclass
class LengthBucket:
    """Documents of min_tokens <= length < max_tokens get `weight` of the draws (S3)."""

    min_tokens: int = 0
    max_tokens: int = 1 << 30
    weight: float = 1.0


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str = ""  # a tokenizer directory; "test" builds the small test tokenizer
    seq_len: int = 4096  # tokens per packed row
    length_mix: list[LengthBucket] = field(default_factory=list)  # empty: no length filter
    append_eos: bool = True
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: last fraction of the steps decays to min lr


@dataclass
class TrainConfig:
    """Everything one training run needs (the stage subclasses change defaults only)."""

    stage: str = "s1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/pretrain"
    steps: int = 1000
    micro_batch_size: int = 1  # rows per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    precision: str = "bf16"  # bf16 (autocast) | fp32
    activation_checkpointing: bool = False
    seed: int = 0
    save_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    stop_after: Optional[int] = None  # end this run after this step (time-boxed jobs)
    moe_aux_coef: Optional[float] = None  # None: the model config's router_aux_loss_coef
    moe_balance: str = "global_batch"  # global_batch (Qwen3) | micro_batch (HF); losses.py
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # tqdm line

    def stage_model_overrides(self) -> dict:
        """Qwen3Config fields the stage sets (the user's model.overrides win)."""
        return {}

    def build_stream(self, tokenizer):
        """The stage's stream of packed rows (dicts of input_ids, position_ids, document_ids,
        labels; see train/data.py). Pre-training packs text; SFT overrides this with chat
        samples whose labels cover the assistant tokens only."""
        from qwen3_fast.train.data import PackedStream

        return PackedStream(self.data, tokenizer)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "an int >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size", "an int >= 1"),
            (self.grad_accum >= 1, "grad_accum", "an int >= 1"),
            (self.precision in ("bf16", "fp32"), "precision", "'bf16' or 'fp32'"),
            (self.data.seq_len >= 2, "data.seq_len", "an int >= 2"),
            (self.optim.schedule in ("cosine", "wsd"), "optim.schedule", "'cosine' or 'wsd'"),
            (self.optim.lr > 0, "optim.lr", "> 0"),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]"),
            (0 < self.optim.decay_fraction <= 1, "optim.decay_fraction", "in (0, 1]"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0"),
            (self.optim.grad_clip >= 0, "optim.grad_clip", ">= 0"),
            (self.model.dtype in ("float32", "bfloat16"), "model.dtype",
             "'float32' or 'bfloat16'"),
            (self.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'"),
            (self.moe_balance in ("global_batch", "micro_batch"), "moe_balance",
             "'global_batch' or 'micro_batch'"),
            (self.save_every >= 0, "save_every", ">= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1"),
            (bool(self.data.sources), "data.sources", "at least one source"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: expected {expected}, got {_get(self, key)!r}")
        for i, src in enumerate(self.data.sources):
            if src.kind not in ("auto", "jsonl", "parquet", "datasets"):
                raise ConfigError(f"data.sources.{i}.kind: expected auto, jsonl, parquet or "
                                  f"datasets, got {src.kind!r}")
            if not src.weight > 0:
                raise ConfigError(f"data.sources.{i}.weight: expected > 0, got {src.weight}")
        for i, b in enumerate(self.data.length_mix):
            if not (0 <= b.min_tokens < b.max_tokens and b.weight > 0):
                raise ConfigError(f"data.length_mix.{i}: expected 0 <= min_tokens < max_tokens "
                                  f"and weight > 0, got {b}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------ dict -> dataclass
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked (and minimally converted: int -> float) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r} ({cls.__name__} has: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------ overrides
def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` items into the nested dict `data` (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {part!r} is not an index of the "
                                      f"{len(node)}-item list {'.'.join(parts[:i])}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is a value, not "
                                  "a mapping")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def load_config(path: Optional[str], overrides: list[str] = (), stages: Optional[dict] = None
                ) -> TrainConfig:
    """Read a YAML config (or none), apply overrides, build the stage's dataclass."""
    from qwen3_fast.train.stages import STAGES

    stages = stages or STAGES
    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    stage = data.get("stage", next(iter(stages)))
    if stage not in stages:
        raise ConfigError(f"stage: expected one of {', '.join(stages)}, got {stage!r}")
    # a stage's nested defaults (S3: data.seq_len 32768, ...) sit under what the user gave
    data = _deep_merge(copy.deepcopy(getattr(stages[stage], "DEFAULTS", {})), data)
    cfg = from_dict(stages[stage], data)
    if path:  # relative data paths are relative to the config file when they exist there
        base = os.path.dirname(os.path.abspath(path))
        for src in cfg.data.sources:
            if src.path and not os.path.isabs(src.path) and os.path.exists(
                    os.path.join(base, src.path)):
                src.path = os.path.join(base, src.path)
    cfg.validate()
    return cfg


__all__ = ["ConfigError", "DataConfig", "LengthBucket", "ModelConfig", "OptimConfig",
           "SourceConfig", "TrainConfig", "apply_overrides", "from_dict", "load_config",
           "to_dict"]
