"""QuantSpec KV quantization: ``qwen3_fast.ops.kv_quantize(x, kind, group_size)`` and its
inverse ``kv_dequantize`` (format: DESIGN.md "KV caches", csrc/include/qwen3_fast/kv_quant_math.h).

kind "key": x [..., T, D], groups of G tokens per channel -> U, L [..., T/G, D, G/2]
uint8 (channel-major inside a group, nibbles packed along tokens: token 2j low, 2j+1 high,
so decode attention scores one channel against G tokens with SIMD), min, scale
[..., T/G, D]. kind "value": x [..., D], groups of G along D -> U, L [..., D/2] (channel
pairs), min, scale [..., D/G]. U/L are the nibble-packed upper/lower halves of the exact
8-bit code; min/scale are in x's dtype (scale rounded up so 15*scale covers the range).
Kernels: csrc/cpu/kv_quantize.cpp, csrc/cuda/kv_quantize.cu, ops/triton/kv_quantize.py.
``kv_dequantize`` is the inverse (float32, used by tests and the reference view of a cache):
a CPU C++ kernel (csrc/cpu/kv_quantize.cpp) and the reference elsewhere (no GPU kernel: no
hot path reads it). No autograd: quantization is not differentiable and caches are
inference state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr

KINDS = ("key", "value")


def kv_quantize_forward(x: Tensor, is_key: bool, group_size: int, backend: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One backend, x contiguous (shapes as the module docstring)."""
    kind = "key" if is_key else "value"
    if backend == "reference":
        return reference.kv_quantize(x, kind, group_size)
    if backend == "triton":
        from qwen3_fast.ops.triton.kv_quantize import kv_quantize_forward as triton_forward

        return triton_forward(x, is_key, group_size)
    d = x.shape[-1]
    u = torch.empty(_codes_shape(x, is_key, group_size), dtype=torch.uint8, device=x.device)
    lo = torch.empty_like(u)
    if is_key:
        meta_shape = (*x.shape[:-2], x.shape[-2] // group_size, d)
        outer, rows, cols, per_col = x.numel() // (group_size * d), group_size, d, 1
    else:
        meta_shape = (*x.shape[:-1], d // group_size)
        outer, rows, cols, per_col = x.numel() // group_size, 1, group_size, 0
    mn = torch.empty(meta_shape, dtype=x.dtype, device=x.device)
    sc = torch.empty_like(mn)
    launch(backend, "kv_quantize", x.device, ptr(x), ptr(u), ptr(lo), ptr(mn), ptr(sc), outer,
           rows, cols, per_col, code(x))
    return u, lo, mn, sc


def _codes_shape(x: Tensor, is_key: bool, group_size: int) -> tuple[int, ...]:
    if is_key:
        return (*x.shape[:-2], x.shape[-2] // group_size, x.shape[-1], group_size // 2)
    return (*x.shape[:-1], x.shape[-1] // 2)


@_backend.custom_op("qwen3_fast::kv_quantize")
def _kv_quantize(x: Tensor, is_key: bool, group_size: int, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kv_quantize_forward(x.contiguous(), is_key, group_size, backend)


@_kv_quantize.register_fake
def _(x, is_key, group_size, backend):
    d = x.shape[-1]
    u = x.new_empty(_codes_shape(x, is_key, group_size), dtype=torch.uint8)
    if is_key:
        meta = (*x.shape[:-2], x.shape[-2] // group_size, d)
    else:
        meta = (*x.shape[:-1], d // group_size)
    return u, torch.empty_like(u), x.new_empty(meta), x.new_empty(meta)


def _check_group(group_size: object) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 \
            or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
    return group_size


def kv_quantize(x: Tensor, kind: str, group_size: int = 128
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize keys (``kind="key"``, x [..., T, D]) or values (``kind="value"``, x [..., D]).

    Returns (U, L, min, scale); see the module docstring for shapes."""
    _checks.check_tensor(x, "x", dtypes=_backend.KERNEL_DTYPES)
    if kind not in KINDS:
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
    g = _check_group(group_size)
    d = x.shape[-1]
    if d == 0 or d % 2:
        raise ValueError(f"x has last dimension {d}; expected an even head_dim > 0")
    if kind == "key":
        if x.dim() < 2:
            raise ValueError(f"x must be [..., T, D] for keys, got shape {tuple(x.shape)}")
        if x.shape[-2] % g:
            raise ValueError(f"x has {x.shape[-2]} tokens; expected a multiple of group_size {g}")
    elif d % g:
        raise ValueError(f"x has head_dim {d}; expected a multiple of group_size {g} for values")
    backend = _backend.resolve("kv_quantize", x)
    if backend == "reference":
        return reference.kv_quantize(x, kind, g)
    return _backend.call_op(_kv_quantize, x, kind == "key", g, backend)


def kv_dequantize(u: Tensor, lo: Tensor | None, mn: Tensor, scale: Tensor, kind: str,
                  group_size: int = 128, bits: int = 8) -> Tensor:
    """Inverse of :func:`kv_quantize` in float32 (bits 8: U and L; bits 4: U only)."""
    _checks.check_tensor(u, "u", dtypes=(torch.uint8,))
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        _checks.check_tensor(lo, "l", dtypes=(torch.uint8,))
        _checks.check_same_shape(u, "u", lo, "l")
    if kind not in KINDS:
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
    g = _check_group(group_size)
    _checks.check_tensor(mn, "mn", dtypes=_backend.KERNEL_DTYPES)
    _checks.check_tensor(scale, "scale", dtypes=(mn.dtype,))
    if kind == "key":
        want_u = (*mn.shape, g // 2) if mn.dim() >= 2 else None
    else:
        want_u = (*mn.shape[:-1], mn.shape[-1] * g // 2) if mn.dim() >= 1 else None
    if want_u is None or tuple(u.shape) != want_u:
        raise ValueError(f"u has shape {tuple(u.shape)}; expected {want_u} for {kind}s with "
                         f"min of shape {tuple(mn.shape)} and group_size {g}")
    _checks.check_same_shape(mn, "mn", scale, "scale")
    if _backend.resolve("kv_dequantize", mn) != "cpu":
        return reference.kv_dequantize(u, lo, mn, scale, kind, g, bits)
    return _backend.call_op(_kv_dequantize, u, lo if bits == 8 else None, mn, scale,
                            kind == "key", g, bits)


@_backend.custom_op("qwen3_fast::kv_dequantize")
def _kv_dequantize(u: Tensor, lo: Optional[Tensor], mn: Tensor, scale: Tensor, is_key: bool,
                   group_size: int, bits: int) -> Tensor:
    u, mn, scale = u.contiguous(), mn.contiguous(), scale.contiguous()
    lo = lo.contiguous() if lo is not None else None
    out = torch.empty(_dequant_shape(u, is_key, group_size), dtype=torch.float32,
                      device=u.device)
    if is_key:  # codes [outer, D, G/2] -> [outer, G, D]
        outer, rows, cols, per_col = mn.numel() // u.shape[-2], group_size, u.shape[-2], 1
    else:  # one group of G channels per row
        outer, rows, cols, per_col = mn.numel(), 1, group_size, 0
    launch("cpu", "kv_dequantize", u.device, ptr(u), ptr(lo) if lo is not None else 0, ptr(mn),
           ptr(scale), ptr(out), outer, rows, cols, per_col, bits, code(mn))
    return out


@_kv_dequantize.register_fake
def _(u, lo, mn, scale, is_key, group_size, bits):
    return u.new_empty(_dequant_shape(u, is_key, group_size), dtype=torch.float32)


def _dequant_shape(u: Tensor, is_key: bool, group_size: int) -> tuple[int, ...]:
    if is_key:  # [..., T/G, D, G/2] -> [..., T, D]
        return (*u.shape[:-3], u.shape[-3] * group_size, u.shape[-2])
    return (*u.shape[:-1], 2 * u.shape[-1])
