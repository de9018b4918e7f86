"""Qwen3Config: one dataclass for dense (``qwen3``) and MoE (``qwen3_moe``) Qwen3 models.

Owns reading and writing HF ``config.json``, the presets of the released family (as data,
``Qwen3Config.from_name("Qwen3-0.6B")``), and validation. Field names are HF's.

Departures from HF:
- one class for both model types; ``num_experts == 0`` means dense;
- both RoPE forms are read: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
  ``rope_parameters`` (transformers 5); :meth:`to_dict` writes both, so either version loads it;
- ``head_dim`` absent means hidden_size // num_attention_heads (HF 4.57's dense config
  defaults to 128 instead; :meth:`to_dict` always writes head_dim, so saved checkpoints agree);
- unknown keys in a HF config are kept in ``extra`` (written back, otherwise ignored), but a
  misspelled keyword given to the constructor is a TypeError, and the core size keys
  (vocab_size, hidden_size, ...) are required in a config.json;
- sliding-window attention (``use_sliding_window``) is not supported: no Qwen3 release uses it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ROPE_TYPES = ("default", "yarn")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")
# Keys of HF configs that are derived or written by HF itself; dropped on read.
_DERIVED_KEYS = ("architectures", "rope_parameters", "layer_types", "transformers_version")

_FAMILY = dict(head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
               max_position_embeddings=40960, vocab_size=151936, bos_token_id=151643,
               eos_token_id=151645, attention_bias=False, hidden_act="silu")
_DENSE = dict(model_type="qwen3", max_window_layers=28)
_MOE = dict(model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)
# name: (layers, hidden, q heads, kv heads, intermediate, tied, moe_intermediate or None)
_TABLE = {
    "Qwen3-0.6B": (28, 1024, 16, 8, 3072, True, None),
    "Qwen3-1.7B": (28, 2048, 16, 8, 6144, True, None),
    "Qwen3-4B": (36, 2560, 32, 8, 9728, True, None),
    "Qwen3-8B": (36, 4096, 32, 8, 12288, False, None),
    "Qwen3-14B": (40, 5120, 40, 8, 17408, False, None),
    "Qwen3-32B": (64, 5120, 64, 8, 25600, False, None),
    "Qwen3-30B-A3B": (48, 2048, 32, 4, 6144, False, 768),
    "Qwen3-235B-A22B": (94, 4096, 64, 4, 12288, False, 1536),
}
PRESETS: dict[str, dict[str, Any]] = {
    name: {**_FAMILY, **(_MOE if moe else _DENSE), "num_hidden_layers": layers,
           "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
           "intermediate_size": inter, "tie_word_embeddings": tied,
           **({"moe_intermediate_size": moe} if moe else {})}
    for name, (layers, hidden, heads, kv, inter, tied, moe) in _TABLE.items()
}


@dataclass
class Qwen3Config:
    """Architecture of a Qwen3 dense or MoE model (HF field names)."""

    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "yarn", "factor": 4.0, ...}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    use_sliding_window: bool = False
    sliding_window: Optional[int] = None
    max_window_layers: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # int or list of ints
    pad_token_id: Optional[int] = None
    # MoE (model_type "qwen3_moe")
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    # unknown keys of a HF config.json, kept for to_dict and otherwise ignored
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive_int(self.hidden_size) and _positive_int(
                self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default")) or "default"

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has a routed MoE block (HF's rule)."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of "
                             f"{', '.join(MODEL_TYPES)}")
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings"]
        if self.num_experts:
            sizes += ["num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"]
        for name in sizes:
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _nonneg_int(self.num_experts):
            raise ValueError(f"num_experts must be an int >= 0, got {self.num_experts!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (half-split RoPE), got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected 'silu'")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive float, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive float, got {self.rope_theta!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} in rope_scaling is not supported; "
                             f"expected one of {', '.join(ROPE_TYPES)}")
        if self.rope_type == "yarn":
            factor = self.rope_scaling.get("factor")
            if not (isinstance(factor, (int, float)) and factor > 0):
                raise ValueError(f"rope_scaling['factor'] must be a positive number for YaRN, "
                                 f"got {factor!r}")
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=True is not supported (no Qwen3 release uses it)")
        if self.model_type == "qwen3" and self.num_experts:
            raise ValueError(f"num_experts={self.num_experts} needs model_type 'qwen3_moe', "
                             "got 'qwen3'")
        if self.num_experts:
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                                 f"num_experts={self.num_experts}")
            bad = [i for i in self.mlp_only_layers
                   if not _nonneg_int(i) or i >= self.num_hidden_layers]
            if bad:
                raise ValueError(f"mlp_only_layers has {bad}; expected layer indices in "
                                 f"[0, {self.num_hidden_layers})")

    # ------------------------------------------------------------------ HF dicts
    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        """From a HF config dict (either RoPE form); unknown keys go to ``extra``."""
        d = copy.deepcopy(dict(d))
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        model_type = d.get("model_type", "qwen3")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; expected one of "
                             f"{', '.join(MODEL_TYPES)}")
        params = d.get("rope_parameters")
        if isinstance(params, dict) and params:
            if isinstance(next(iter(params.values())), dict):  # per-layer-type form
                params = params.get("full_attention") or next(iter(params.values()))
            params = dict(params)
            if "rope_theta" in params:
                d["rope_theta"] = params.pop("rope_theta")
            if params.get("rope_type", params.get("type", "default")) not in (None, "default"):
                d["rope_scaling"] = params
        if d.get("rope_scaling") and (d["rope_scaling"].get("rope_type")
                                      or d["rope_scaling"].get("type")) == "default":
            d["rope_scaling"] = None
        if "num_local_experts" in d:  # transformers 5's name for num_experts
            local = d.pop("num_local_experts")
            d.setdefault("num_experts", local)
        if model_type == "qwen3_moe":
            d.setdefault("num_experts", 128)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        for k in _DERIVED_KEYS:
            d.pop(k, None)
        if not known.get("use_sliding_window"):
            known["sliding_window"] = None  # HF ignores it unless use_sliding_window
        return cls(**known, extra=d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen3Config":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen3Config":
        """From a checkpoint directory (its config.json) or a config.json path."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {file}")
        return cls.from_json_file(file)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Qwen3Config":
        """A released model's architecture: "Qwen3-0.6B", "0.6B", "Qwen/Qwen3-30B-A3B", ..."""
        key = name.split("/")[-1].lower()
        if not key.startswith("qwen3-"):
            key = "qwen3-" + key
        for preset, values in PRESETS.items():
            if preset.lower() == key:
                return cls(**{**copy.deepcopy(values), **overrides})
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(PRESETS)}")

    def to_dict(self) -> dict:
        """A HF-compatible config.json dict (loads in transformers 4.x and 5.x)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name))
             for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**copy.deepcopy(self.extra), **d}
        d["architectures"] = [MODEL_TYPES[self.model_type]]
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": float(self.rope_theta)}
        for k, v in (self.rope_scaling or {}).items():
            if k not in ("type", "rope_type"):
                rope_parameters[k] = v
        d["rope_parameters"] = rope_parameters
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                      "output_router_logits", "router_aux_loss_coef"):
                d.pop(k)
        for k in ("max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id"):
            if d[k] is None:
                d.pop(k)
        return d

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, v, d = self.hidden_size, self.vocab_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * d
        dense = 3 * h * self.intermediate_size
        moe = self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
        total = v * h * (1 if self.tie_word_embeddings else 2) + h
        for i in range(self.num_hidden_layers):
            total += attn + 2 * h + (moe if self.is_sparse_layer(i) else dense)
        return total


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


__all__ = ["PRESETS", "Qwen3Config"]
