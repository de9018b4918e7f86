"""Rotary position embedding: ``rope_cache`` and ``qk_norm_rope``.

``rope_cache(config_or_params, max_positions)`` builds the fp32 cos/sin tables
[max_positions, D] exactly as HF's rotary embedding does (default RoPE and YaRN: beta_fast 32,
beta_slow 1, attention factor 0.1 ln(factor) + 1 on cos and sin, or an explicit
``attention_factor``). ``qk_norm_rope`` (Qwen3's per-head RMSNorm over head_dim on q and k
followed by the half-split rotation at the given positions) and its in-place twin
``qk_norm_rope_`` live in ops/qk_norm_rope.py (fused kernels) and are re-exported here.

Departure from HF: HF builds cos/sin per batch from position_ids in every forward; here one
table is built once and gathered.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from qwen3_fast.ops import _checks, reference
from qwen3_fast.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_  # noqa: F401 (re-export)

ROPE_TYPES = ("default", "yarn")


def _rope_params(config_or_params: Any) -> dict:
    """Normalize a Qwen3Config, a HF-style config object or a dict to one parameter dict."""
    if isinstance(config_or_params, Mapping):
        src = dict(config_or_params)
        get = src.get
    else:
        get = lambda key, default=None: getattr(config_or_params, key, default)  # noqa: E731
    params = get("rope_parameters")
    scaling = dict(params) if isinstance(params, Mapping) else dict(get("rope_scaling") or {})
    theta = scaling.get("rope_theta", get("rope_theta", get("theta")))
    head_dim = get("head_dim") or (
        get("hidden_size") // get("num_attention_heads")
        if get("hidden_size") and get("num_attention_heads") else None)
    if head_dim is None:
        raise ValueError("rope_cache: config_or_params gives no head_dim (nor hidden_size and "
                         "num_attention_heads)")
    if theta is None:
        raise ValueError("rope_cache: config_or_params gives no rope_theta")
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_cache: rope type {rope_type!r} is not supported; expected one "
                         f"of {', '.join(ROPE_TYPES)}")
    out = {"head_dim": int(head_dim), "theta": float(theta), "rope_type": rope_type}
    if rope_type == "yarn":
        if "factor" not in scaling:
            raise ValueError("rope_cache: YaRN needs rope_scaling['factor']")
        out.update(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings")
                or get("max_position_embeddings")),
            beta_fast=float(scaling.get("beta_fast") or 32),
            beta_slow=float(scaling.get("beta_slow") or 1),
            truncate=bool(scaling.get("truncate", True)),
            attention_factor=scaling.get("attention_factor"))
    return out


def rope_cache(config_or_params: Any, max_positions: int, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_positions, D] (HF-exact in fp32, then cast to ``dtype``).

    ``config_or_params``: a Qwen3Config, a HF config, or a dict with ``head_dim`` (or
    ``hidden_size``/``num_attention_heads``), ``rope_theta`` and optionally ``rope_scaling``
    (or ``rope_parameters``) with ``rope_type`` "default" or "yarn".
    """
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions <= 0:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    params = _rope_params(config_or_params)
    if params["head_dim"] % 2:
        raise ValueError(f"head_dim must be even for half-split RoPE, got {params['head_dim']}")
    inv_freq, attention_factor = reference.rope_inv_freq(**params)
    cos, sin = reference.rope_cos_sin(inv_freq.to(device), attention_factor, max_positions)
    return cos.to(dtype), sin.to(dtype)
