"""Decode attention over a KV cache: ``qwen3_fast.ops.flash_decode(q, cache, layer, precision)``.

Flash-decoding (split-KV, partial outputs merged by log-sum-exp), the query heads of one kv
head processed together (GQA), ragged lengths, and for the hierarchical cache the quantized
part and the full-precision buffer in one pass, codes dequantized on the fly. precision 16
reads a :class:`~qwen3_fast.cache.DenseKVCache`; 8 (target: U and L) and 4 (draft: U only)
read a :class:`~qwen3_fast.cache.HierarchicalKVCache`. q holds the newest n tokens of each
sequence, already written to the cache: n = 1 is decoding, n > 1 the speculative verify
step (causal among the n).

Verify over a hierarchical cache: query row i (position p = length - n + i) reads codes for
[0, nq_i) and the full-precision ring for [nq_i, p], nq_i the quantized length the cache had
at length p + 1 (reference.kv_row_quant_lengths; the same formula in every kernel), so row i
equals plain one-token decoding of position p whenever the window crosses a group boundary
(the window needs n <= max_speculative_tokens + 1; longer steps such as a chunked prefill
read the groups that left the ring as codes).

Layers: kernels (csrc/cpu/flash_decode.cpp, ops/triton/flash_decode.py) -> tensor-level
custom ops ``qwen3_fast::flash_decode_dense`` / ``flash_decode_hier`` (tensors, sizes,
backend; no cache objects) -> :func:`flash_decode` (checks, backend choice).
The reference path dequantizes the cache to float32 and runs ops/reference.flash_decode.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr

PRECISIONS = (16, 8, 4)


# ------------------------------------------------------------------ reference (tensor level)
def dequantize_layer(k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale, k_buf, v_buf,
                     lengths: Tensor, precision: int, group_size: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both views of one hierarchical layer in logical token order, float32
    [B, Hkv, T = max length, D] each: (k, v) dequantized from the codes (zero past the
    quantized capacity) and (k, v) gathered from the ring (slot t % ring). Which one a
    query row reads at token t is its business (reference.kv_row_quant_lengths)."""
    t = int(lengths.max()) if lengths.numel() else 0
    ring = k_buf.shape[2]
    d = k_buf.shape[3]
    gv = d // v_min.shape[-1]
    tq = min(t, v_u.shape[2]) // group_size * group_size
    kq = reference.kv_dequantize(k_u[:, :, :tq // group_size], k_l[:, :, :tq // group_size],
                                 k_min[:, :, :tq // group_size],
                                 k_scale[:, :, :tq // group_size], "key", group_size, precision)
    vq = reference.kv_dequantize(v_u[:, :, :tq], v_l[:, :, :tq], v_min[:, :, :tq],
                                 v_scale[:, :, :tq], "value", gv, precision)
    pad = t - tq
    kq = torch.nn.functional.pad(kq, (0, 0, 0, pad))
    vq = torch.nn.functional.pad(vq, (0, 0, 0, pad))
    pos = torch.arange(t, device=k_buf.device)
    slots = (pos % ring).view(1, 1, t, 1).expand(k_buf.shape[0], k_buf.shape[1], t, d)
    kb = torch.gather(k_buf.float(), 2, slots)
    vb = torch.gather(v_buf.float(), 2, slots)
    return kq, vq, kb, vb


# ------------------------------------------------------------------ one backend
def flash_decode_forward(q: Tensor, k_u: Optional[Tensor], k_l: Optional[Tensor],
                         k_min: Optional[Tensor], k_scale: Optional[Tensor],
                         v_u: Optional[Tensor], v_l: Optional[Tensor], v_min: Optional[Tensor],
                         v_scale: Optional[Tensor], k_buf: Tensor, v_buf: Tensor,
                         n_quant: Optional[Tensor], lengths: Tensor, precision: int,
                         group_size: int, scale: float, backend: str,
                         max_length: int = 0) -> Tensor:
    # max_length > 0: a bound on every length, known on the host (a captured decode step,
    # generate/graph_step.py); the reference and GPU paths then size their work from it
    # instead of reading lengths.max() back from the device (only the dense op passes one;
    # the hierarchical reference below still reads the lengths).
    if backend == "reference":
        if precision == 16:
            t = max_length or int(lengths.max())
            return reference.flash_decode(q, k_buf[:, :, :t], v_buf[:, :, :t], lengths, scale)
        kq, vq, kb, vb = dequantize_layer(k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale,
                                          k_buf, v_buf, lengths, precision, group_size)
        rows = reference.kv_row_quant_lengths(lengths, n_quant, q.shape[2], group_size,
                                              k_buf.shape[2])
        return reference.flash_decode(q, kq, vq, lengths, scale, kb, vb, rows)
    if backend == "triton":
        from qwen3_fast.ops.triton.flash_decode import flash_decode_forward as triton_forward

        return triton_forward(q, k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale, k_buf,
                              v_buf, n_quant, lengths, precision, group_size, scale,
                              max_length)
    b, hq, n, d = q.shape
    hkv, ring = k_buf.shape[1], k_buf.shape[2]
    out = torch.empty_like(q)
    if backend == "cuda":
        return _cuda_forward(q, k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale, k_buf,
                             v_buf, n_quant, lengths, precision, group_size, scale, out,
                             max_length)
    # keys + values read (a host read of lengths is free on the CPU): decides whether the
    # call may use a thread team under the engine's small-step cap (_kernel_args.launch)
    token_bytes = 2 * hkv * d * (k_buf.element_size() if precision == 16 else precision / 8)
    stream = int(int(lengths.sum()) * token_bytes)
    if precision == 16:
        launch(backend, "flash_decode", q.device, ptr(q), 0, 0, 0, 0, 0, 0, 0, 0, ptr(k_buf),
               ptr(v_buf), 0, ptr(lengths), ptr(out), b, hq, hkv, n, d, 0, ring, 1, d, 16,
               scale, code(q), stream_bytes=stream)
    else:
        launch(backend, "flash_decode", q.device, ptr(q), ptr(k_u), ptr(k_l), ptr(k_min),
               ptr(k_scale), ptr(v_u), ptr(v_l), ptr(v_min), ptr(v_scale), ptr(k_buf),
               ptr(v_buf), ptr(n_quant), ptr(lengths), ptr(out), b, hq, hkv, n, d,
               v_u.shape[2], ring, group_size, d // v_min.shape[-1], precision, scale, code(q),
               stream_bytes=stream)
    return out


CUDA_WARPS = 4  # must match csrc/cuda/flash_decode.cu kWarps


def _cuda_forward(q, k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale, k_buf, v_buf,
                  n_quant, lengths, precision, group_size, scale, out, max_length=0):
    """Split count: about two blocks per SM over the batch's kv heads, chunks of >= 256
    tokens; the float32 partials live in a workspace the merge kernel reads. The splits
    cover max_length when given (no host read; splits past a sequence's length are empty:
    lse -inf, weight 0 in the merge), else the longest length read from the device."""
    b, hq, n, d = q.shape
    hkv, ring = k_buf.shape[1], k_buf.shape[2]
    max_len = max_length or int(lengths.max())
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = max(1, (2 * sms) // max(1, b * hkv))
    chunk = max(256, -(-max_len // want))
    splits = -(-max_len // chunk)
    r = (hq // hkv) * n
    o_part = torch.empty((b * hkv * splits * CUDA_WARPS, r, d), dtype=torch.float32,
                         device=q.device)
    lse = torch.empty((b * hkv * splits * CUDA_WARPS, r), dtype=torch.float32, device=q.device)
    if precision == 16:
        launch("cuda", "flash_decode", q.device, ptr(q), 0, 0, 0, 0, 0, 0, 0, 0, ptr(k_buf),
               ptr(v_buf), 0, ptr(lengths), ptr(out), ptr(o_part), ptr(lse), b, hq, hkv, n, d,
               0, ring, 1, d, chunk, splits, 16, scale, code(q))
    else:
        launch("cuda", "flash_decode", q.device, ptr(q), ptr(k_u), ptr(k_l), ptr(k_min),
               ptr(k_scale), ptr(v_u), ptr(v_l), ptr(v_min), ptr(v_scale), ptr(k_buf),
               ptr(v_buf), ptr(n_quant), ptr(lengths), ptr(out), ptr(o_part), ptr(lse), b, hq,
               hkv, n, d, v_u.shape[2], ring, group_size, d // v_min.shape[-1], chunk, splits,
               precision, scale, code(q))
    return out


# ------------------------------------------------------------------ custom ops
@_backend.custom_op("qwen3_fast::flash_decode_dense")
def _flash_decode_dense(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float,
                        backend: str, max_length: int = 0) -> Tensor:
    return flash_decode_forward(q.contiguous(), None, None, None, None, None, None, None, None,
                                k, v, None, lengths, 16, 1, scale, backend, max_length)


@_flash_decode_dense.register_fake
def _(q, k, v, lengths, scale, backend, max_length=0):
    return torch.empty_like(q)


@_backend.custom_op("qwen3_fast::flash_decode_hier")
def _flash_decode_hier(q: Tensor, k_u: Tensor, k_l: Tensor, k_min: Tensor, k_scale: Tensor,
                       v_u: Tensor, v_l: Tensor, v_min: Tensor, v_scale: Tensor, k_buf: Tensor,
                       v_buf: Tensor, n_quant: Tensor, lengths: Tensor, precision: int,
                       group_size: int, scale: float, backend: str) -> Tensor:
    return flash_decode_forward(q.contiguous(), k_u, k_l, k_min, k_scale, v_u, v_l, v_min,
                                v_scale, k_buf, v_buf, n_quant, lengths, precision, group_size,
                                scale, backend)


@_flash_decode_hier.register_fake
def _(q, k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale, k_buf, v_buf, n_quant, lengths,
      precision, group_size, scale, backend):
    return torch.empty_like(q)


# ------------------------------------------------------------------ public op
def flash_decode(q: Tensor, cache, layer: int, precision: int = 16,
                 scale: Optional[float] = None) -> Tensor:
    """Attention of the newest n tokens over one layer of a KV cache.

    Parameters
    ----------
    q : [B, Hq, n, D] in the cache dtype; the n tokens are already in the cache (its
        lengths include them); query i of sequence b sits at position lengths[b] - n + i
    cache : DenseKVCache (precision 16) or HierarchicalKVCache (precision 8 or 4)
    layer : layer index
    precision : 16, 8 (target view) or 4 (draft view)
    scale : softmax scale, default D ** -0.5

    Returns [B, Hq, n, D] in q's dtype.
    """
    from qwen3_fast.cache import DenseKVCache, HierarchicalKVCache

    _checks.check_tensor(q, "q", ndim=4, dtypes=_backend.KERNEL_DTYPES)
    if not isinstance(cache, (DenseKVCache, HierarchicalKVCache)):
        raise TypeError(f"cache must be a DenseKVCache or HierarchicalKVCache, got "
                        f"{type(cache).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer must be an int in [0, {cache.num_layers}), got {layer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 16, 8 or 4, got {precision!r}")
    if precision not in cache.precisions:
        raise ValueError(f"precision {precision} does not fit a {cache.format} cache "
                         f"(expected one of {cache.precisions})")
    b, hq, n, d = q.shape
    if b != cache.batch_size or d != cache.head_dim:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [{cache.batch_size}, Hq, n, "
                         f"{cache.head_dim}]")
    if hq == 0 or hq % cache.num_kv_heads:
        raise ValueError(f"q has {hq} heads; expected a multiple of the cache's "
                         f"{cache.num_kv_heads} kv heads")
    if q.dtype != cache.dtype:
        raise TypeError(f"q has dtype {q.dtype}; expected the cache dtype {cache.dtype}")
    _checks.check_same_device(cache.lengths, "cache", q, "q")
    lengths = cache.seq_lengths()
    if n == 0 or min(lengths) < n:
        raise ValueError(f"q has n = {n} new tokens but the shortest cached sequence has "
                         f"{min(lengths)}; write the new tokens first (n >= 1)")
    if scale is None:
        scale = d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    backend = _backend.resolve("flash_decode", q)
    if precision == 16:
        return _backend.call_op(_flash_decode_dense, q, cache.k[layer], cache.v[layer],
                                cache.lengths, float(scale), backend)
    c = cache
    return _backend.call_op(_flash_decode_hier, q, c.k_u[layer], c.k_l[layer], c.k_min[layer],
                            c.k_scale[layer], c.v_u[layer], c.v_l[layer], c.v_min[layer],
                            c.v_scale[layer], c.k_buf[layer], c.v_buf[layer], c.n_quant,
                            c.lengths, precision, c.group_size, float(scale), backend)
