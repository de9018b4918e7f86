"""Fused residual add + RMSNorm: ``qwen3_fast.ops.add_rms_norm(x, residual, weight, eps)``.

Returns ``(y, new_residual)`` with ``new_residual = x + residual`` (in the model dtype, as
HF adds) and ``y = rms_norm(new_residual, weight, eps)``: the pre-norm step of a decoder
layer in one pass instead of three. Layers as in ops/rms_norm.py; the backward is
``rms_norm_backward`` with the gradient of new_residual added, and both x and residual
receive that same gradient. Saved for backward: new_residual, weight and rstd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr
from qwen3_fast.ops.rms_norm import _rms_norm_bwd, _row_major, check_inputs


def add_rms_norm_forward(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: [T, H] -> (y [T, H] weight dtype, new_residual [T, H], rstd [T] fp32)."""
    if backend == "triton":
        from qwen3_fast.ops.triton.add_rms_norm import add_rms_norm_forward as triton_forward

        return triton_forward(x, residual, weight, eps)
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=weight.dtype, device=x.device)
    new_residual = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    launch(backend, "add_rms_norm_forward", x.device, ptr(x), x.stride(0), ptr(residual),
           residual.stride(0), ptr(weight), ptr(y), ptr(new_residual), ptr(rstd), rows, cols,
           eps, code(x), code(weight))
    return y, new_residual, rstd


@_backend.custom_op("qwen3_fast::add_rms_norm_fwd")
def _add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return add_rms_norm_forward(_row_major(x), _row_major(residual), weight.contiguous(), eps,
                                backend)


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, backend):
    return (x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape),
            x.new_empty(x.shape[:1], dtype=torch.float32))


def _setup(ctx, inputs, output):
    _x, _residual, weight, _eps, backend = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.backend = backend


def _backward(ctx, dy, d_new_residual, _drstd):
    new_residual, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, new_residual, weight, rstd, d_new_residual, ctx.backend)
    return dx, dx, dw, None, None


torch.library.register_autograd("qwen3_fast::add_rms_norm_fwd", _backward, setup_context=_setup)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Residual add then HF-exact RMSNorm.

    Parameters
    ----------
    x, residual : Tensor, shape [..., H], same dtype (float32/float16/bfloat16/float64)
    weight : Tensor, shape [H], x's dtype or float32
    eps : float

    Returns
    -------
    (y, new_residual) : y [..., H] in weight's dtype, new_residual [..., H] in x's dtype.
    """
    hidden = check_inputs(x, weight, eps)
    _checks.check_tensor(residual, "residual")
    _checks.check_same_device(x, "x", residual, "residual")
    _checks.check_same_dtype(x, "x", residual, "residual")
    _checks.check_same_shape(x, "x", residual, "residual")
    _checks.check_last_dim(residual, "residual", hidden)
    backend = _backend.resolve("add_rms_norm", x)
    if backend == "reference":
        return reference.add_rms_norm(x, residual, weight, eps)
    y, new_residual, _ = _backend.call_op(_add_rms_norm_fwd, x.reshape(-1, hidden),
                                          residual.reshape(-1, hidden), weight, float(eps),
                                          backend)
    return y.view(x.shape), new_residual.view(x.shape)
