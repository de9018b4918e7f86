"""QuantSpec KV quantization in Triton: ``kv_quantize_forward(x, is_key, group_size)``.

Same format and arithmetic as csrc/cpu/kv_quantize.cpp (csrc/include/qwen3_fast/
kv_quant_math.h): min/max in fp32, scale (max - min)/15 rounded to nearest in the model
dtype then bumped one step up if 15*scale would not cover the range, codes
floor((x - min) / (scale/16) + 0.5) clamped to [0, 240] with IEEE division (div_rn), U/L
split, nibble packing (element 2i low, 2i+1 high). bfloat16 rounding is done with integer
ops so the interpreter (which truncates fp32 -> bf16 casts) matches the GPU.
Keys: one program per group (a [G, D] tile, stats per column), codes stored channel-major
[D, G/2] with token pairs packed per byte. Values: one program per block of rows.

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_triton_kv.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _div(a, b):
    if _INTERPRETED:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _store_dtype_round_up(s32, rng, IS_BF16: tl.constexpr, IS_F16: tl.constexpr):
    """fp32 scale -> the model dtype's value (as fp32), nearest then one step up if needed."""
    if IS_BF16:
        bits = s32.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        r = bits.to(tl.float32, bitcast=True)
        up = (bits + 65536).to(tl.float32, bitcast=True)
        return tl.where(r * 15.0 < rng, up, r)
    elif IS_F16:
        h = s32.to(tl.float16)
        r = h.to(tl.float32)
        up = (h.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True).to(tl.float32)
        return tl.where(r * 15.0 < rng, up, r)
    else:
        bits = s32.to(tl.int32, bitcast=True)
        up = (bits + 1).to(tl.float32, bitcast=True)
        return tl.where(s32 * 15.0 < rng, up, s32)


@triton.jit
def _codes(x, mn, s):
    step = s * 0.0625
    safe = tl.where(step > 0, step, 1.0)
    y = tl.where(step > 0, _div(x - mn, safe), 0.0)
    y = tl.floor(y + 0.5)
    y = tl.minimum(tl.maximum(y, 0.0), 240.0)
    return y.to(tl.int32)


@triton.jit
def _kv_quantize_values_kernel(x_ptr, u_ptr, l_ptr, mn_ptr, sc_ptr, n_rows,
                               cols: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr,
                               IS_BF16: tl.constexpr, IS_F16: tl.constexpr):
    pid = tl.program_id(0)  # BR value groups (rows of `cols` channels), stats per row
    half: tl.constexpr = cols // 2
    i = tl.arange(0, BH)
    r = tl.arange(0, BR)
    row0 = pid * BR
    rmask = (row0 + r) < n_rows
    cmask = i < half
    m2 = rmask[:, None] & cmask[None, :]
    offs = (row0 + r)[:, None] * cols + 2 * i[None, :]
    xe = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + offs + 1, mask=m2, other=0.0).to(tl.float32)
    big = 3.0e38
    mn = tl.minimum(tl.min(tl.where(m2, xe, big), axis=1), tl.min(tl.where(m2, xo, big), axis=1))
    mx = tl.maximum(tl.max(tl.where(m2, xe, -big), axis=1), tl.max(tl.where(m2, xo, -big), axis=1))
    s = _store_dtype_round_up(_div(mx - mn, 15.0), mx - mn, IS_BF16, IS_F16)
    tl.store(mn_ptr + row0 + r, mn.to(mn_ptr.dtype.element_ty), mask=rmask)
    tl.store(sc_ptr + row0 + r, s.to(sc_ptr.dtype.element_ty), mask=rmask)
    ce = _codes(xe, mn[:, None], s[:, None])
    co = _codes(xo, mn[:, None], s[:, None])
    ue = (ce + 8) >> 4
    uo = (co + 8) >> 4
    le = ce - 16 * ue + 8
    lo = co - 16 * uo + 8
    poffs = (row0 + r)[:, None] * half + i[None, :]
    tl.store(u_ptr + poffs, (ue | (uo << 4)).to(tl.uint8), mask=m2)
    tl.store(l_ptr + poffs, (le | (lo << 4)).to(tl.uint8), mask=m2)


@triton.jit
def _kv_quantize_keys_kernel(x_ptr, u_ptr, l_ptr, mn_ptr, sc_ptr, G: tl.constexpr,
                             D: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
                             IS_BF16: tl.constexpr, IS_F16: tl.constexpr):
    pid = tl.program_id(0)  # one key group: tokens [pid*G, pid*G + G) x D channels
    half: tl.constexpr = G // 2
    p = tl.arange(0, BP)  # token pairs (2p, 2p + 1)
    c = tl.arange(0, BD)
    m2 = (p < half)[:, None] & (c < D)[None, :]
    offs = (pid * G + 2 * p)[:, None] * D + c[None, :]
    xe = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + offs + D, mask=m2, other=0.0).to(tl.float32)
    big = 3.0e38
    mn = tl.minimum(tl.min(tl.where(m2, xe, big), axis=0), tl.min(tl.where(m2, xo, big), axis=0))
    mx = tl.maximum(tl.max(tl.where(m2, xe, -big), axis=0), tl.max(tl.where(m2, xo, -big), axis=0))
    s = _store_dtype_round_up(_div(mx - mn, 15.0), mx - mn, IS_BF16, IS_F16)
    cmask = c < D
    tl.store(mn_ptr + pid * D + c, mn.to(mn_ptr.dtype.element_ty), mask=cmask)
    tl.store(sc_ptr + pid * D + c, s.to(sc_ptr.dtype.element_ty), mask=cmask)
    ce = _codes(xe, mn[None, :], s[None, :])
    co = _codes(xo, mn[None, :], s[None, :])
    ue = (ce + 8) >> 4
    uo = (co + 8) >> 4
    le = ce - 16 * ue + 8
    lo = co - 16 * uo + 8
    poffs = (pid * D + c)[None, :] * half + p[:, None]  # [.., D, G/2]: channel-major
    tl.store(u_ptr + poffs, (ue | (uo << 4)).to(tl.uint8), mask=m2)
    tl.store(l_ptr + poffs, (le | (lo << 4)).to(tl.uint8), mask=m2)


def kv_quantize_forward(x: Tensor, is_key: bool, group_size: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = x.contiguous()
    d = x.shape[-1]
    if is_key:
        t = x.shape[-2]
        u = torch.empty((*x.shape[:-2], t // group_size, d, group_size // 2),
                        dtype=torch.uint8, device=x.device)
        lo = torch.empty_like(u)
        mn = torch.empty((*x.shape[:-2], t // group_size, d), dtype=x.dtype, device=x.device)
        sc = torch.empty_like(mn)
        n_groups = x.numel() // (group_size * d)
        if n_groups:
            _kv_quantize_keys_kernel[(n_groups,)](
                x, u, lo, mn, sc, group_size, d, triton.next_power_of_2(group_size // 2),
                triton.next_power_of_2(d), x.dtype == torch.bfloat16, x.dtype == torch.float16)
        return u, lo, mn, sc
    u = torch.empty((*x.shape[:-1], d // 2), dtype=torch.uint8, device=x.device)
    lo = torch.empty_like(u)
    mn = torch.empty((*x.shape[:-1], d // group_size), dtype=x.dtype, device=x.device)
    sc = torch.empty_like(mn)
    n_rows = x.numel() // group_size
    br = 16
    if n_rows:
        _kv_quantize_values_kernel[(triton.cdiv(n_rows, br),)](
            x, u, lo, mn, sc, n_rows, group_size, br,
            triton.next_power_of_2(max(group_size // 2, 1)),
            x.dtype == torch.bfloat16, x.dtype == torch.float16)
    return u, lo, mn, sc


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kv_quantize_values_kernel, InterpretedFunction)


_INTERPRETED = tl.constexpr(_interpreted())
