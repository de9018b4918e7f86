"""Linear without bias: ``qwen3_fast.ops.linear(x, weight)`` = ``x @ weight.T``.

x [..., K], weight [N, K] -> y [..., N] in x's dtype (float32 accumulation).

Where the kernel runs: bfloat16 CPU tensors with 1 to 16 rows (decode: one to a few
tokens), on a CPU with AVX512-BF16 through csrc/cpu/linear.cpp (and its portable
float loop elsewhere). There torch's bf16 GEMM reads the weight at a few GB/s per thread,
while the kernel streams each weight row once at memory speed (bench/bench_linear.py).
Everything else (other dtypes, more rows, CUDA) calls ``torch.nn.functional.linear``
on purpose: cuBLAS / oneDNN / MKL are the well-kept GEMMs for those shapes, and
torch.compile can fuse around it. Forcing the ``reference`` backend runs
``reference.linear`` (float32 math, cast back).

Layers: kernel -> custom op ``qwen3_fast::linear_fwd`` (fake + autograd) -> :func:`linear`.
Backward: dx = dy @ W, dW = dy^T @ x with torch matmuls (training shapes are not skinny).
Saved for backward: x and weight (inputs, alive anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import launch, ptr

MAX_KERNEL_ROWS = 16
_HAS_KERNEL: list[bool] = []


def _kernel_built() -> bool:
    """Whether the loaded _C has linear_cpu (an older build may not: then torch runs)."""
    if not _HAS_KERNEL:
        from qwen3_fast import _ext

        _HAS_KERNEL.append(bool(_ext.available() and hasattr(_ext.extension(), "linear_cpu")))
    return _HAS_KERNEL[0]


def _use_kernel(x2d: Tensor, weight: Tensor, backend: str) -> bool:
    """Whether the C++ skinny kernel takes this call (see the module docstring)."""
    return (backend == "cpu" and _kernel_built() and x2d.device.type == "cpu"
            and x2d.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and 1 <= x2d.shape[0] <= MAX_KERNEL_ROWS
            and x2d.shape[1] > 0 and weight.shape[0] > 0)


# ------------------------------------------------------------------ one backend, 2-D
def linear_forward(x: Tensor, weight: Tensor, backend: str) -> Tensor:
    """x: [M, K], weight: [N, K] -> y: [M, N] (x's dtype)."""
    if backend == "reference":
        return reference.linear(x, weight)
    if _use_kernel(x, weight, backend):
        x, weight = x.contiguous(), weight.contiguous()
        y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
        launch("cpu", "linear", x.device, ptr(x), ptr(weight), ptr(y), x.shape[0],
               weight.shape[0], x.shape[1], stream_bytes=weight.numel() * weight.element_size())
        return y
    return F.linear(x, weight)


# ------------------------------------------------------------------ custom op
@_backend.custom_op("qwen3_fast::linear_fwd")
def _linear_fwd(x: Tensor, weight: Tensor, backend: str) -> Tensor:
    return linear_forward(x, weight, backend)


@_linear_fwd.register_fake
def _(x, weight, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, _backend_name = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
    dw = (dy.t() @ x.to(dy.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw, None


torch.library.register_autograd("qwen3_fast::linear_fwd", _backward, setup_context=_setup)


# ------------------------------------------------------------------ public op
def check_inputs(x: object, weight: object) -> int:
    """Validate linear inputs; returns the input size K."""
    _checks.check_tensor(x, "x")
    _checks.check_tensor(weight, "weight", ndim=2)
    _checks.check_same_dtype(x, "x", weight, "weight")
    _checks.check_same_device(x, "x", weight, "weight")
    k = weight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]}; expected in_features K = {k} "
                         f"(weight.shape[1], weight shape {tuple(weight.shape)})")
    return k


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` (no bias), like ``torch.nn.functional.linear(x, weight)``.

    Parameters
    ----------
    x : Tensor, shape [..., K], float32/float16/bfloat16/float64
    weight : Tensor, shape [N, K], x's dtype and device

    Returns
    -------
    Tensor, shape [..., N], x's dtype. Differentiable w.r.t. x and weight.
    """
    k = check_inputs(x, weight)
    backend = _backend.resolve("linear", x)
    if _backend.get_backend() is None and x.device.type != "cpu":
        backend = x.device.type  # no GPU kernel of ours here to verify: the vendor GEMM runs
    if k == 0:
        return F.linear(x, weight)  # zeros; nothing for a kernel to do
    rows = x.numel() // k
    if backend != "reference" and not _use_kernel(x.reshape(rows, k), weight, backend):
        # not the skinny bf16 CPU case: the vendor GEMM is already right (module docstring)
        return F.linear(x, weight)
    y = _backend.call_op(_linear_fwd, x.reshape(rows, k), weight, backend)
    return y.view(*x.shape[:-1], weight.shape[0])
