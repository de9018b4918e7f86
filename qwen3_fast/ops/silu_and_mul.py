"""SwiGLU activation: ``qwen3_fast.ops.silu_and_mul(gate_up)`` = silu(gate) * up.

``gate_up`` is [..., 2I] with the gate first (the layout of a fused gate_up projection and
of the stacked MoE expert weights). Rounds like HF's ``act_fn(gate) * up``. The backward
recomputes silu from gate_up rather than saving it, so only gate_up is saved.
Layers as in ops/rms_norm.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr
from qwen3_fast.ops.rms_norm import _row_major


def silu_and_mul_forward(gate_up: Tensor, backend: str) -> Tensor:
    """gate_up: [T, 2I] (row stride free) -> y: [T, I]."""
    if backend == "triton":
        from qwen3_fast.ops.triton.silu_and_mul import silu_and_mul_forward as triton_forward

        return triton_forward(gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    launch(backend, "silu_and_mul_forward", gate_up.device, ptr(gate_up), gate_up.stride(0),
           ptr(y), rows, inter, code(gate_up))
    return y


def silu_and_mul_backward(dy: Tensor, gate_up: Tensor, backend: str) -> Tensor:
    """dy: [T, I], gate_up: [T, 2I] -> d_gate_up: [T, 2I]."""
    dy = dy.contiguous()
    if backend == "triton":
        from qwen3_fast.ops.triton.silu_and_mul import silu_and_mul_backward as triton_backward

        return triton_backward(dy, gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = torch.empty((rows, 2 * inter), dtype=gate_up.dtype, device=gate_up.device)
    launch(backend, "silu_and_mul_backward", gate_up.device, ptr(dy), ptr(gate_up),
           gate_up.stride(0), ptr(d_gate_up), rows, inter, code(gate_up))
    return d_gate_up


@_backend.custom_op("qwen3_fast::silu_and_mul_fwd")
def _silu_and_mul_fwd(gate_up: Tensor, backend: str) -> Tensor:
    return silu_and_mul_forward(_row_major(gate_up), backend)


@_silu_and_mul_fwd.register_fake
def _(gate_up, backend):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("qwen3_fast::silu_and_mul_bwd", mutates_args=())
def _silu_and_mul_bwd(dy: Tensor, gate_up: Tensor, backend: str) -> Tensor:
    return silu_and_mul_backward(dy, _row_major(gate_up), backend)


@_silu_and_mul_bwd.register_fake
def _(dy, gate_up, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    gate_up, backend = inputs
    ctx.save_for_backward(gate_up)
    ctx.backend = backend


def _backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _silu_and_mul_bwd(dy, gate_up, ctx.backend), None


torch.library.register_autograd("qwen3_fast::silu_and_mul_fwd", _backward, setup_context=_setup)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU.

    Parameters
    ----------
    gate_up : Tensor, shape [..., 2I], float32/float16/bfloat16/float64; gate columns first.

    Returns
    -------
    Tensor, shape [..., I], same dtype.
    """
    _checks.check_tensor(gate_up, "gate_up")
    width = _checks.check_last_dim(gate_up, "gate_up")
    if width % 2 != 0:
        raise ValueError(f"gate_up has last dimension {width}; expected an even size 2*I "
                         "(gate columns then up columns)")
    backend = _backend.resolve("silu_and_mul", gate_up)
    if backend == "reference":
        return reference.silu_and_mul(gate_up)
    y = _backend.call_op(_silu_and_mul_fwd, gate_up.reshape(-1, width), backend)
    return y.view(*gate_up.shape[:-1], width // 2)
