"""QuantSpec KV quantization in Triton: ``kv_quantize_forward(x, is_key, group_size)``.

Same format and arithmetic as csrc/cpu/kv_quantize.cpp (csrc/include/qwen3_fast/
kv_quant_math.h): min/max in fp32, scale (max - min)/15 rounded to nearest in the model
dtype then bumped one step up if 15*scale would not cover the range, codes
floor((x - min) / (scale/16) + 0.5) clamped to [0, 240] with IEEE division (div_rn), U/L
split, nibble packing (element 2i low, 2i+1 high). bfloat16 rounding is done with integer
ops so the interpreter (which truncates fp32 -> bf16 casts) matches the GPU.
One program per key group (a [G, D] tile, stats per column) or per block of value rows.

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
def _kv_quantize_kernel(x_ptr, u_ptr, l_ptr, mn_ptr, sc_ptr, n_rows, rows: tl.constexpr,
                        cols: tl.constexpr, PER_COLUMN: tl.constexpr, BR: tl.constexpr,
                        BH: tl.constexpr, IS_BF16: tl.constexpr, IS_F16: tl.constexpr):
    pid = tl.program_id(0)
    half: tl.constexpr = cols // 2
    i = tl.arange(0, BH)
    r = tl.arange(0, BR)
    if PER_COLUMN:  # one [rows, cols] key group per program, stats per column
        row0 = pid * rows
        rmask = r < rows
    else:  # BR value rows per program, stats per row
        row0 = pid * BR
        rmask = (row0 + r) < n_rows
    cmask = i < half
    m2 = rmask[:, None] & cmask[None, :]
    offs = (row0 + r)[:, None] * cols + 2 * i[None, :]
    xe = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + offs + 1, mask=m2, other=0.0).to(tl.float32)
    big = 3.0e38
    if PER_COLUMN:
        mn_e = tl.min(tl.where(m2, xe, big), axis=0)
        mx_e = tl.max(tl.where(m2, xe, -big), axis=0)
        mn_o = tl.min(tl.where(m2, xo, big), axis=0)
        mx_o = tl.max(tl.where(m2, xo, -big), axis=0)
        s_e = _store_dtype_round_up((mx_e - mn_e) / 15.0, mx_e - mn_e, IS_BF16, IS_F16)
        s_o = _store_dtype_round_up((mx_o - mn_o) / 15.0, mx_o - mn_o, IS_BF16, IS_F16)
        meta = pid * cols + 2 * i
        tl.store(mn_ptr + meta, mn_e.to(mn_ptr.dtype.element_ty), mask=cmask)
        tl.store(mn_ptr + meta + 1, mn_o.to(mn_ptr.dtype.element_ty), mask=cmask)
        tl.store(sc_ptr + meta, s_e.to(sc_ptr.dtype.element_ty), mask=cmask)
        tl.store(sc_ptr + meta + 1, s_o.to(sc_ptr.dtype.element_ty), mask=cmask)
        ce = _codes(xe, mn_e[None, :], s_e[None, :])
        co = _codes(xo, mn_o[None, :], s_o[None, :])
    else:
        mn = tl.minimum(tl.min(tl.where(m2, xe, big), axis=1), tl.min(tl.where(m2, xo, big), axis=1))
        mx = tl.maximum(tl.max(tl.where(m2, xe, -big), axis=1), tl.max(tl.where(m2, xo, -big), axis=1))
        s = _store_dtype_round_up((mx - mn) / 15.0, mx - mn, IS_BF16, IS_F16)
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


def kv_quantize_forward(x: Tensor, is_key: bool, group_size: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = x.contiguous()
    d = x.shape[-1]
    u = torch.empty((*x.shape[:-1], d // 2), dtype=torch.uint8, device=x.device)
    lo = torch.empty_like(u)
    if is_key:
        meta = (*x.shape[:-2], x.shape[-2] // group_size, d)
        rows, cols = group_size, d
        n_rows = x.numel() // d
        grid = (n_rows // group_size,)
        br = triton.next_power_of_2(rows)
    else:
        meta = (*x.shape[:-1], d // group_size)
        rows, cols = 1, group_size
        n_rows = x.numel() // group_size
        br = 16
        grid = (triton.cdiv(n_rows, br),)
    mn = torch.empty(meta, dtype=x.dtype, device=x.device)
    sc = torch.empty_like(mn)
    if n_rows:
        _kv_quantize_kernel[grid](x, u, lo, mn, sc, n_rows, rows, cols, is_key, br,
                                  triton.next_power_of_2(max(cols // 2, 1)),
                                  x.dtype == torch.bfloat16, x.dtype == torch.float16)
    return u, lo, mn, sc


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kv_quantize_kernel, InterpretedFunction)


_INTERPRETED = tl.constexpr(_interpreted())
