"""RMSNorm as a torch custom op: ``qwen3_fast.ops.rms_norm(x, weight, eps)``.

Exactly HF ``Qwen3RMSNorm``: ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``.
Layers: kernels (csrc/cpu/rms_norm.cpp, csrc/cuda/rms_norm.cu, ops/triton/rms_norm.py)
-> ``rms_norm_forward`` / ``rms_norm_backward`` (one backend each, 2-D tensors)
-> custom ops ``qwen3_fast::rms_norm_fwd`` / ``rms_norm_bwd`` with fake and autograd
-> :func:`rms_norm` (checks, backend choice) -> :class:`RMSNorm` module.

The forward saves x, weight and rstd ([T] float32, 4 bytes per row) for the backward:
x and weight are alive anyway, and rstd spares the backward a reduction over each row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, cuda_partial_rows, launch, ptr


# ------------------------------------------------------------------ one backend, 2-D
def rms_norm_forward(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """x: [T, H] (row stride free, last dim contiguous), weight: [H] ->
    (y: [T, H] in weight's dtype, rstd: [T] float32)."""
    if backend == "triton":
        from qwen3_fast.ops.triton.rms_norm import rms_norm_forward as triton_forward

        return triton_forward(x, weight, eps)
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=weight.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    launch(backend, "rms_norm_forward", x.device, ptr(x), x.stride(0), ptr(weight), ptr(y),
           ptr(rstd), rows, cols, eps, code(x), code(weight))
    return y, rstd


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                      d_residual: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """dy: [T, H] weight dtype; x: [T, H]; rstd: [T]; d_residual: optional [T, H] x dtype,
    added to dx (the add_rms_norm backward) -> (dx: [T, H] x dtype, dw: [H] weight dtype)."""
    dy = dy.contiguous()
    d_residual = None if d_residual is None else d_residual.contiguous()
    if backend == "triton":
        from qwen3_fast.ops.triton.rms_norm import rms_norm_backward as triton_backward

        return triton_backward(dy, x, weight, rstd, d_residual)
    rows, cols = x.shape
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if backend == "cuda":
        partial_rows = cuda_partial_rows(x.device, rows)
        dw_partial = torch.empty((partial_rows, cols), dtype=torch.float32, device=x.device)
        launch(backend, "rms_norm_backward", x.device, ptr(dy), ptr(x), x.stride(0), ptr(weight),
               ptr(rstd), ptr(d_residual), ptr(dx), ptr(dw_partial), partial_rows, rows, cols,
               code(x), code(weight))
        dw = dw_partial.sum(0)
    else:
        dw = torch.empty((cols,), dtype=torch.float32, device=x.device)
        launch(backend, "rms_norm_backward", x.device, ptr(dy), ptr(x), x.stride(0), ptr(weight),
               ptr(rstd), ptr(d_residual), ptr(dx), ptr(dw), rows, cols, code(x), code(weight))
    return dx, dw.to(weight.dtype)


def _row_major(x: Tensor) -> Tensor:
    # Kernels take a row stride but need a unit column stride; tracing may hand the real
    # kernel a layout the fake tensor did not promise, so normalize here.
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------ custom ops
@_backend.custom_op("qwen3_fast::rms_norm_fwd")
def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return rms_norm_forward(_row_major(x), weight.contiguous(), eps, backend)


@_rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("qwen3_fast::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                  d_residual: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return rms_norm_backward(dy, _row_major(x), weight.contiguous(), rstd, d_residual, backend)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, d_residual, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    x, weight, _eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd, None, ctx.backend)
    return dx, dw, None, None


torch.library.register_autograd("qwen3_fast::rms_norm_fwd", _backward, setup_context=_setup)


# ------------------------------------------------------------------ public op
def check_inputs(x: object, weight: object, eps: object, name: str = "x") -> int:
    """Validate rms_norm-style inputs; returns the hidden size H."""
    _checks.check_tensor(x, name)
    _checks.check_tensor(weight, "weight", ndim=1)
    _checks.check_same_device(x, name, weight, "weight")
    _checks.check_weight_dtype(weight, x)
    _checks.check_eps(eps)
    return _checks.check_last_dim(x, name, weight.shape[0])


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """HF-exact RMSNorm.

    Parameters
    ----------
    x : Tensor, shape [..., H], float32/float16/bfloat16 (float64 runs the reference)
    weight : Tensor, shape [H], x's dtype or float32
    eps : float

    Returns
    -------
    Tensor, shape [..., H], dtype of ``weight`` (HF promotes bf16 * fp32 to fp32).
    """
    hidden = check_inputs(x, weight, eps)
    backend = _backend.resolve("rms_norm", x)
    if backend == "reference":
        return reference.rms_norm(x, weight, eps)
    y, _ = _backend.call_op(_rms_norm_fwd, x.reshape(-1, hidden), weight, float(eps), backend)
    return y.view(*x.shape[:-1], hidden)


class RMSNorm(torch.nn.Module):
    """Drop-in for HF ``Qwen3RMSNorm`` (same ``weight`` parameter name)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
