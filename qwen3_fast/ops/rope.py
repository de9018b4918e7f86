"""Rotary position embedding: ``rope_cache`` and ``qk_norm_rope``.

``rope_cache(config_or_params, max_positions)`` builds the fp32 cos/sin tables
[max_positions, D] exactly as HF's rotary embedding does (default RoPE and YaRN: beta_fast 32,
beta_slow 1, attention factor 0.1 ln(factor) + 1 on cos and sin, or an explicit
``attention_factor``). ``qk_norm_rope`` is Qwen3's per-head RMSNorm over head_dim on q and k
followed by the half-split rotation at the given positions.

Reference-backed for now (plain torch, autograd through torch, ops/reference.py; the
QK-norm goes through the ``rms_norm`` op); a later
issue puts fused kernels behind the same names. Departure from HF: HF builds cos/sin per
batch from position_ids in every forward; here one table is built once and gathered.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from qwen3_fast.ops import _checks, reference
from qwen3_fast.ops.rms_norm import rms_norm

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


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                 sin: Tensor, positions: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """QK-norm then RoPE, HF-exact.

    Parameters
    ----------
    q : [T, Hq, D] or [B, S, Hq, D];  k : [T, Hkv, D] or [B, S, Hkv, D] (same leading dims)
    q_weight, k_weight : [D] RMSNorm weights
    cos, sin : [P, D] tables from :func:`rope_cache`
    positions : [T] or [B, S] integer positions < P
    eps : RMSNorm epsilon

    Returns (q_out, k_out) with q's and k's shapes, in the normed dtype (promote of x, weight).
    """
    _checks.check_tensor(q, "q", min_ndim=3)
    _checks.check_tensor(k, "k", min_ndim=3)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [T, Hq, D] or [B, S, Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected the leading dims of q "
                         f"{tuple(q.shape[:-2])} plus [Hkv, D]")
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(f"q has head_dim {head_dim}; expected an even size")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[-1]}; expected q's head_dim {head_dim}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        _checks.check_tensor(w, name, ndim=1)
        if w.shape[0] != head_dim:
            raise ValueError(f"{name} has shape {tuple(w.shape)}; expected [{head_dim}]")
        _checks.check_same_device(q, "q", w, name)
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(t, name, ndim=2)
        if t.shape[1] != head_dim:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [P, {head_dim}]")
        _checks.check_same_device(q, "q", t, name)
    if cos.shape != sin.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)}; expected cos's shape {tuple(cos.shape)}")
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError("positions must be an int32/int64 tensor, got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.shape != q.shape[:-2]:
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected q's leading "
                         f"dims {tuple(q.shape[:-2])}")
    _checks.check_same_device(q, "q", positions, "positions")
    _checks.check_eps(eps)
    # The norms run through the rms_norm op (C++/CUDA kernels where available, same HF
    # rounding); the rotation is the reference until the fused kernel lands.
    return reference.rope_rotate(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos,
                                 sin, positions)
