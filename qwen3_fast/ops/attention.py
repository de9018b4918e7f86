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
              attention_mask: Optional[Tensor] = None, scale: Optional[float] = None,
              document_ids: Optional[Tensor] = None) -> Tensor:
    """Scaled dot-product attention with grouped kv heads.

    Parameters
    ----------
    q : [B, Hq, S, D];  k, v : [B, Hkv, S_kv, D] with Hq % Hkv == 0, same dtype and device
    causal : mask future keys (query i sits at key position S_kv - S + i)
    attention_mask : optional [B, S_kv] keep-mask (bool or 0/1 ints; nonzero = attend)
    scale : softmax scale, default D ** -0.5
    document_ids : optional [B, S] integer document index per token (packed rows, S == S_kv):
        a query attends only to keys of its own document (see :func:`document_attention`)

    Returns [B, Hq, S, D] in q's dtype.
    """
    _checks.check_tensor(q, "q", ndim=4)
    _checks.check_tensor(k, "k", ndim=4)
    _checks.check_tensor(v, "v", ndim=4)
    if torch.is_autocast_enabled(q.device.type) and q.dtype != torch.float64:
        # autocast runs SDPA in its lower precision (as in HF under autocast, where q/k
        # leave the fp32 QK-norm as fp32 and v leaves the linear as bf16)
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
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
    if document_ids is not None:
        if not isinstance(document_ids, Tensor) or document_ids.is_floating_point():
            raise TypeError("document_ids must be an integer tensor [B, S]")
        if document_ids.shape != (b, s) or s != s_kv:
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}; expected "
                             f"[B, S] = [{b}, {s}] with S == S_kv ({s_kv})")
        _checks.check_same_device(q, "q", document_ids, "document_ids")
        return document_attention(q, k, v, document_ids, causal, attention_mask, scale)
    return reference.attention(q, k, v, causal, attention_mask, scale)


# ---------------------------------------------------------------- packed documents (issue 9)
_compiled_flex = None
_block_mask_cache = None  # (key, BlockMask, the document_ids it was built from: keeps id valid)


def document_attention(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor, causal: bool,
                       attention_mask: Optional[Tensor], scale: Optional[float],
                       use_flex: Optional[bool] = None) -> Tensor:
    """Attention that never crosses documents of a packed row (training packing).

    On CUDA: torch's flex_attention (compiled) with a block mask from ``document_ids``, so
    blocks between different documents are skipped, not computed and masked. Elsewhere (the
    CPU, or ``use_flex=False``): SDPA with the dense [B, 1, S, S] mask ``causal & same
    document``; eager flex_attention would materialize the same scores, so it buys nothing.
    q [B, Hq, S, D]; k, v [B, Hkv, S, D]; document_ids [B, S] -> [B, Hq, S, D].
    """
    import torch.nn.functional as F

    if use_flex is None:
        use_flex = q.device.type == "cuda" and attention_mask is None
    b, hq, s, _ = q.shape
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        docs = document_ids

        def mask_mod(bi, _h, qi, ki):
            same = docs[bi, qi] == docs[bi, ki]
            return (qi >= ki) & same if causal else same

        # one block mask per forward: every layer passes the same document_ids tensor
        global _block_mask_cache
        key = (id(docs), docs._version, causal, b, s)
        if _block_mask_cache is None or _block_mask_cache[0] != key:
            _block_mask_cache = (key, create_block_mask(mask_mod, b, None, s, s,
                                                        device=q.device), docs)
        block_mask = _block_mask_cache[1]
        fn = _compiled_flex if q.device.type == "cuda" else flex_attention
        return fn(q, k, v, block_mask=block_mask, scale=scale,
                  enable_gqa=q.shape[1] != k.shape[1])
    mask = document_ids[:, :, None] == document_ids[:, None, :]  # [B, S, S]
    if causal:
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if attention_mask is not None:
        mask = mask & attention_mask.to(torch.bool)[:, None, :]
    groups = hq // k.shape[1]
    if groups > 1:  # SDPA's GQA path takes no mask on every backend; repeat kv heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
