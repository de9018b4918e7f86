"""Causal GQA attention: ``qwen3_fast.ops.attention(q, k, v, causal=..., attention_mask=...)``.

Reference-backed for now (torch SDPA, ops/reference.py), with HF's sdpa semantics: softmax
in fp32 inside SDPA, query head h reads kv head h // (Hq / Hkv), a padding keep-mask
[B, S_kv] combined with the causal mask (queries are the last S of the S_kv positions), and
rows that may attend to nothing (left padding) give zeros rather than NaN. Kernels come
later behind this name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _checks, reference

MASK_DTYPES = (torch.bool, torch.int32, torch.int64, torch.uint8)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
              attention_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Scaled dot-product attention with grouped kv heads.

    Parameters
    ----------
    q : [B, Hq, S, D];  k, v : [B, Hkv, S_kv, D] with Hq % Hkv == 0, same dtype and device
    causal : mask future keys (query i sits at key position S_kv - S + i)
    attention_mask : optional [B, S_kv] keep-mask (bool or 0/1 ints; nonzero = attend)
    scale : softmax scale, default D ** -0.5

    Returns [B, Hq, S, D] in q's dtype.
    """
    _checks.check_tensor(q, "q", ndim=4)
    _checks.check_tensor(k, "k", ndim=4)
    _checks.check_tensor(v, "v", ndim=4)
    for name, t in (("k", k), ("v", v)):
        _checks.check_same_device(q, "q", t, name)
        _checks.check_same_dtype(q, "q", t, name)
    if k.shape != v.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected k's shape {tuple(k.shape)}")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [{b}, Hkv, S_kv, {d}]")
    hkv, s_kv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads and k has {hkv}; expected Hq divisible by Hkv")
    if causal and s > s_kv:
        raise ValueError(f"q has {s} positions but k has {s_kv}; causal attention needs S <= S_kv")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dtype not in MASK_DTYPES:
            raise TypeError("attention_mask must be a bool or integer tensor, got "
                            f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}")
        if attention_mask.shape != (b, s_kv):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                             f"expected [B, S_kv] = [{b}, {s_kv}]")
        _checks.check_same_device(q, "q", attention_mask, "attention_mask")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not scale > 0):
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    return reference.attention(q, k, v, causal, attention_mask, scale)
