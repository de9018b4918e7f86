"""RMSNorm in Triton: ``rms_norm_forward`` / ``rms_norm_backward`` on 2-D tensors.

Same contract and rounding as csrc/cpu/rms_norm.cpp (HF Qwen3RMSNorm order): fp32 sum of
squares, ``rstd = 1 / sqrt(mean + eps)``, ``n = x * rstd`` rounded to x's dtype, then
``y = w * n`` rounded to the weight's dtype. One program holds one whole row
(BLOCK = next power of two of H, up to MAX_FUSED_SIZE). The backward follows Liger-Kernel:
a fixed grid of programs walks rows, each keeps its dweight partial in registers (fp32),
and torch sums the partial rows.

Also home of :func:`_round_to` and :func:`launch_settings`, shared with the other Triton
ops. The Triton interpreter (TRITON_INTERPRET=1) truncates fp32 -> bfloat16 casts, so
interpreted kernels round to bfloat16 with integer ops (round to nearest even, as the
GPU's native cast, which compiled kernels use).

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_triton_ops.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# One row per program in registers; Liger uses the same cap. Qwen3 hidden sizes are <= 8192.
MAX_FUSED_SIZE = 65536


def launch_settings(cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a program that holds `cols` elements of a row."""
    block = max(16, triton.next_power_of_2(cols))
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"hidden size {cols} is larger than the Triton kernels' maximum "
                         f"{MAX_FUSED_SIZE}; use the cuda or reference backend")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _num_programs(device: torch.device, rows: int) -> int:
    """Programs (and fp32 dweight partial rows) for the backward's column reduction."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another; a few still test the partials
        sms = 2
    return max(1, min(rows, sms))


@triton.jit
def _round_to(v, PTR):
    """fp32 `v` rounded (nearest even) to PTR's element type, returned as fp32."""
    if PTR.dtype.element_ty == tl.bfloat16 and not _INTERPRETED:
        return v.to(tl.bfloat16).to(tl.float32)
    elif PTR.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif PTR.dtype.element_ty == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


# Whether @triton.jit made interpreted functions (it decides once, at this module's import).
_INTERPRETED = tl.constexpr(isinstance(_round_to, InterpretedFunction))


@triton.jit
def _rms_norm_forward_kernel(x_ptr, x_row_stride, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                             BLOCK: tl.constexpr):
    """One row: y[row] = round_w(w * round_x(x[row] * rstd)), rstd[row] = 1/rms."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    tl.store(rstd_ptr + row, rstd)
    n = _round_to(x * rstd, x_ptr)
    y = _round_to(w * n, y_ptr)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, x_row_stride, w_ptr, rstd_ptr, dres_ptr, dx_ptr,
                              dw_partial_ptr, n_rows, n_cols, rows_per_program,
                              HAS_DRES: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [pid * rows_per_program, ...): dx = rstd * (dn - n * mean(dn * n)) (+ dres),
    dn = dy * w; dw_partial[pid] = sum over those rows of dy * round_x(n)."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Walk rows by advancing pointers (int64 base offsets; the interpreter's loop index is
    # a plain int, so the loop body must not need it).
    start = row_start.to(tl.int64)
    x_ptr += start * x_row_stride
    dy_ptr += start * n_cols
    dx_ptr += start * n_cols
    dres_ptr += start * n_cols
    rstd_ptr += start
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        n = x * rstd
        dn = dy * w
        mean_dot = tl.sum(dn * n, axis=0) / n_cols
        dx = rstd * (dn - n * mean_dot)
        if HAS_DRES:
            dx += tl.load(dres_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dx = _round_to(dx, dx_ptr)
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * _round_to(n, x_ptr)
        x_ptr += x_row_stride
        dy_ptr += n_cols
        dx_ptr += n_cols
        dres_ptr += n_cols
        rstd_ptr += 1
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """HF-exact RMSNorm forward.

    Parameters
    ----------
    x : Tensor, shape [T, H], unit column stride (row stride free)
    weight : Tensor, shape [H], contiguous, x's dtype or float32
    eps : float

    Returns
    -------
    (y, rstd) : y [T, H] contiguous in weight's dtype; rstd [T] float32.
    """
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=weight.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    block, num_warps = launch_settings(cols)
    _rms_norm_forward_kernel[(rows,)](x, x.stride(0), weight, y, rstd, cols, float(eps),
                                      BLOCK=block, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                      d_residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """RMSNorm backward (also the add_rms_norm backward through `d_residual`).

    Parameters
    ----------
    dy : Tensor, shape [T, H], contiguous, weight's dtype
    x : Tensor, shape [T, H], unit column stride (row stride free)
    weight : Tensor, shape [H], contiguous
    rstd : Tensor, shape [T], float32, from the forward
    d_residual : None or Tensor, shape [T, H], contiguous, x's dtype; added to dx

    Returns
    -------
    (dx, dw) : dx [T, H] contiguous in x's dtype; dw [H] in weight's dtype.
    """
    rows, cols = x.shape
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros((cols,), dtype=weight.dtype, device=x.device)
    block, num_warps = launch_settings(cols)
    # The backward holds ~6 fp32 values per column (w, dw_acc, x, dy, n, dn) against the
    # forward's ~3, and runs one program per SM: twice the warps keep it out of register
    # spills up to H = 8192 (ptxas -v, sm_90) and hide more latency.
    num_warps = min(32, 2 * num_warps)
    programs = _num_programs(x.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    dw_partial = torch.empty((programs, cols), dtype=torch.float32, device=x.device)
    has_dres = d_residual is not None
    _rms_norm_backward_kernel[(programs,)](
        dy, x, x.stride(0), weight, rstd, d_residual if has_dres else dx, dx, dw_partial,
        rows, cols, rows_per_program, HAS_DRES=has_dres, BLOCK=block, num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)
