"""Fused residual add + RMSNorm in Triton: ``add_rms_norm_forward`` on 2-D tensors.

Same rounding as csrc/cpu/add_rms_norm.cpp: ``new_residual = x + residual`` rounded to the
model dtype (HF adds in that dtype), then the RMSNorm forward of new_residual, in one read
of x and residual. There is no backward kernel here: the op's backward is
:func:`qwen3_fast.ops.triton.rms_norm.rms_norm_backward` with ``d_residual``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen3_fast.ops.triton.rms_norm import _round_to, launch_settings


@triton.jit
def _add_rms_norm_forward_kernel(x_ptr, x_row_stride, res_ptr, res_row_stride, w_ptr, y_ptr,
                                 new_res_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """One row: s = round_x(x + res) -> new_res; y = round_w(w * round_x(s * rstd))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = _round_to(x + r, new_res_ptr)
    tl.store(new_res_ptr + row * n_cols + cols, s.to(new_res_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(s * s, axis=0) / n_cols
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    tl.store(rstd_ptr + row, rstd)
    n = _round_to(s * rstd, new_res_ptr)
    y = _round_to(w * n, y_ptr)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_forward(x: Tensor, residual: Tensor, weight: Tensor,
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Residual add then HF-exact RMSNorm.

    Parameters
    ----------
    x, residual : Tensor, shape [T, H], same dtype, unit column stride (row strides free)
    weight : Tensor, shape [H], contiguous, x's dtype or float32
    eps : float

    Returns
    -------
    (y, new_residual, rstd) : y [T, H] in weight's dtype; new_residual [T, H] contiguous
    in x's dtype; rstd [T] float32 (of new_residual).
    """
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=weight.dtype, device=x.device)
    new_residual = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, new_residual, rstd
    block, num_warps = launch_settings(cols)
    _add_rms_norm_forward_kernel[(rows,)](
        x, x.stride(0), residual, residual.stride(0), weight, y, new_residual, rstd, cols,
        float(eps), BLOCK=block, num_warps=num_warps)
    return y, new_residual, rstd
