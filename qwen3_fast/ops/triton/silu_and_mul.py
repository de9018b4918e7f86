"""SwiGLU in Triton: ``silu_and_mul_forward`` / ``silu_and_mul_backward`` on 2-D tensors.

Same rounding as csrc/cpu/silu_and_mul.cpp (HF ``act_fn(gate) * up`` in the model dtype):
``y = round(round(silu(g)) * u)``, fp32 math. The backward recomputes sigmoid from gate_up
(nothing but gate_up is saved). Elementwise, so the grid is (rows, column blocks of I)
rather than one program per whole row; any I works.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen3_fast.ops.triton.rms_norm import _round_to

# Column block per program: wide enough for 16-byte accesses on every thread, small
# enough that MoE widths (I = 768) do not leave most lanes masked.
MAX_BLOCK = 1024


def _settings(inter: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(inter)))
    return block, 4 if block >= 512 else 2


@triton.jit
def _silu_and_mul_forward_kernel(gu_ptr, gu_row_stride, y_ptr, inter, BLOCK: tl.constexpr):
    """y[row, c] = round(round(silu(g)) * u) for one column block of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g_ptrs = gu_ptr + row * gu_row_stride + cols
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    a = _round_to(tl.div_rn(g, 1.0 + tl.exp(-g)), gu_ptr)
    y = _round_to(a * u, y_ptr)
    tl.store(y_ptr + row * inter + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_backward_kernel(dy_ptr, gu_ptr, gu_row_stride, dgu_ptr, inter,
                                  BLOCK: tl.constexpr):
    """dg = dy * u * sig * (1 + g * (1 - sig)), du = dy * g * sig (fp32, then rounded)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g_ptrs = gu_ptr + row * gu_row_stride + cols
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-g))
    dg = _round_to(dy * u * sig * (1.0 + g * (1.0 - sig)), dgu_ptr)
    du = _round_to(dy * g * sig, dgu_ptr)
    dg_ptrs = dgu_ptr + row * 2 * inter + cols
    tl.store(dg_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptrs + inter, du.to(dgu_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_forward(gate_up: Tensor) -> Tensor:
    """SwiGLU forward.

    Parameters
    ----------
    gate_up : Tensor, shape [T, 2I], gate columns first, unit column stride (row stride free)

    Returns
    -------
    Tensor, shape [T, I], contiguous, gate_up's dtype.
    """
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or inter == 0:
        return y
    block, num_warps = _settings(inter)
    grid = (rows, triton.cdiv(inter, block))
    _silu_and_mul_forward_kernel[grid](gate_up, gate_up.stride(0), y, inter, BLOCK=block,
                                       num_warps=num_warps)
    return y


def silu_and_mul_backward(dy: Tensor, gate_up: Tensor) -> Tensor:
    """SwiGLU backward.

    Parameters
    ----------
    dy : Tensor, shape [T, I], contiguous, gate_up's dtype
    gate_up : Tensor, shape [T, 2I], unit column stride (row stride free)

    Returns
    -------
    d_gate_up : Tensor, shape [T, 2I], contiguous, gate_up's dtype.
    """
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = torch.empty((rows, 2 * inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or inter == 0:
        return d_gate_up
    block, num_warps = _settings(inter)
    grid = (rows, triton.cdiv(inter, block))
    _silu_and_mul_backward_kernel[grid](dy, gate_up, gate_up.stride(0), d_gate_up, inter,
                                        BLOCK=block, num_warps=num_warps)
    return d_gate_up
