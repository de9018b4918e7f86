"""Fused QK-norm + RoPE as torch custom ops: ``qk_norm_rope`` and the in-place ``qk_norm_rope_``.

Qwen3 applies an RMSNorm over head_dim to every query and key head (``Qwen3RMSNorm``) and
then the half-split rotary embedding (``apply_rotary_pos_emb``); unfused that is four
passes over q and k and several temporaries. One kernel does both per head row.

Rounding is HF's, step by step (TX = q/k dtype, TW = weight dtype = output dtype):
``y = round_TW(w * round_TX(x * rstd))``, ``c, s = round_TW(cos[pos]), round_TW(sin[pos])``,
``out = round_TW(round_TW(y * c) + round_TW(rotate_half(y) * s))`` -- bf16/fp16 outputs equal
the unfused HF path bit for bit except where the fp32 sum of squares, summed in another
order, moves rstd by an ulp.

Layers: kernels (csrc/cpu/qk_norm_rope.cpp, csrc/cuda/qk_norm_rope.cu,
ops/triton/qk_norm_rope.py) -> ``qk_norm_rope_forward`` / ``qk_norm_rope_backward`` /
``qk_norm_rope_inplace`` (one backend each, q [N, Hq, D], k [N, Hkv, D]) -> custom ops
``qwen3_fast::qk_norm_rope_fwd`` / ``qk_norm_rope_bwd`` (fake + autograd) and
``qwen3_fast::qk_norm_rope_`` (mutates q and k, no autograd) -> :func:`qk_norm_rope` /
:func:`qk_norm_rope_` (checks, backend choice).

The forward saves q, k, the weights, cos/sin, positions and rstd ([N, H] float32): the
backward recomputes the normalized values instead of keeping the outputs.

Positions are checked against the table length P: the CPU kernel raises ValueError naming
``positions`` before writing anything; the reference path checks in Python (outside
torch.compile tracing, where it would need the data); the CUDA and Triton kernels never
read outside the tables and write NaN for a token whose position is out of range (no device
sync to raise).
"""
from __future__ import annotations

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr

POSITION_DTYPES = (torch.int32, torch.int64)


# ------------------------------------------------------------------ one backend, [N, H, D]
def qk_norm_rope_forward(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                         sin: Tensor, positions: Tensor, eps: float,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q: [N, Hq, D], k: [N, Hkv, D] (unit last stride), weights [D], cos/sin [P, D] float32
    contiguous, positions [N] int32/int64 -> (q_out [N, Hq, D], k_out [N, Hkv, D] in the
    weights' dtype, q_rstd [N, Hq], k_rstd [N, Hkv] float32)."""
    if backend == "triton":
        from qwen3_fast.ops.triton.qk_norm_rope import qk_norm_rope_forward as triton_forward

        return triton_forward(q, k, q_weight, k_weight, cos, sin, positions, eps)
    n, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty((n, hq, d), dtype=q_weight.dtype, device=q.device)
    k_out = torch.empty((n, hkv, d), dtype=k_weight.dtype, device=q.device)
    q_rstd = torch.empty((n, hq), dtype=torch.float32, device=q.device)
    k_rstd = torch.empty((n, hkv), dtype=torch.float32, device=q.device)
    _launch_forward(q, k, q_weight, k_weight, cos, sin, positions, q_out, k_out, q_rstd, k_rstd,
                    eps, backend)
    return q_out, k_out, q_rstd, k_rstd


def qk_norm_rope_inplace(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                         sin: Tensor, positions: Tensor, eps: float, backend: str) -> None:
    """As :func:`qk_norm_rope_forward`, writing the result into q and k (weights in q's dtype)."""
    if backend == "triton":
        from qwen3_fast.ops.triton.qk_norm_rope import qk_norm_rope_inplace as triton_inplace

        triton_inplace(q, k, q_weight, k_weight, cos, sin, positions, eps)
        return
    _launch_forward(q, k, q_weight, k_weight, cos, sin, positions, q, k, None, None, eps, backend)


def _launch_forward(q, k, q_weight, k_weight, cos, sin, positions, q_out, k_out, q_rstd, k_rstd,
                    eps, backend):
    n, hq, d = q.shape
    launch(backend, "qk_norm_rope_forward", q.device, ptr(q), q.stride(0), q.stride(1), ptr(k),
           k.stride(0), k.stride(1), ptr(q_weight), ptr(k_weight), ptr(cos), ptr(sin),
           ptr(positions), positions.dtype == torch.int64, ptr(q_out), q_out.stride(0),
           q_out.stride(1), ptr(k_out), k_out.stride(0), k_out.stride(1), ptr(q_rstd),
           ptr(k_rstd), n, hq, k.shape[1], d, cos.shape[0], float(eps), code(q), code(q_weight))


def qk_norm_rope_backward(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor,
                          k_weight: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                          q_rstd: Tensor, k_rstd: Tensor,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq [N, Hq, D] q dtype, dk [N, Hkv, D] k dtype, dq_weight [D], dk_weight [D])."""
    dq_out, dk_out = dq_out.contiguous(), dk_out.contiguous()
    if backend == "triton":
        from qwen3_fast.ops.triton.qk_norm_rope import qk_norm_rope_backward as triton_backward

        return triton_backward(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, positions,
                               q_rstd, k_rstd)
    n, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((n, hkv, d), dtype=k.dtype, device=q.device)
    if backend == "cuda":
        from qwen3_fast.ops._kernel_args import cuda_partial_rows

        parts = cuda_partial_rows(q.device, n)
        dqw = torch.empty((parts, d), dtype=torch.float32, device=q.device)
        dkw = torch.empty((parts, d), dtype=torch.float32, device=q.device)
        launch(backend, "qk_norm_rope_backward", q.device, ptr(dq_out), ptr(dk_out), ptr(q),
               q.stride(0), q.stride(1), ptr(k), k.stride(0), k.stride(1), ptr(q_weight),
               ptr(k_weight), ptr(cos), ptr(sin), ptr(positions), positions.dtype == torch.int64,
               ptr(q_rstd), ptr(k_rstd), ptr(dq), ptr(dk), ptr(dqw), ptr(dkw), parts, n, hq, hkv,
               d, cos.shape[0], code(q), code(q_weight))
        dqw, dkw = dqw.sum(0), dkw.sum(0)
    else:
        dqw = torch.empty((d,), dtype=torch.float32, device=q.device)
        dkw = torch.empty((d,), dtype=torch.float32, device=q.device)
        launch(backend, "qk_norm_rope_backward", q.device, ptr(dq_out), ptr(dk_out), ptr(q),
               q.stride(0), q.stride(1), ptr(k), k.stride(0), k.stride(1), ptr(q_weight),
               ptr(k_weight), ptr(cos), ptr(sin), ptr(positions), positions.dtype == torch.int64,
               ptr(q_rstd), ptr(k_rstd), ptr(dq), ptr(dk), ptr(dqw), ptr(dkw), n, hq, hkv, d,
               cos.shape[0], code(q), code(q_weight))
    # separate tensors: custom-op outputs must not alias one another
    return dq, dk, dqw.to(q_weight.dtype), dkw.to(k_weight.dtype)


def _heads_major(x: Tensor) -> Tensor:
    # Kernels take token and head strides but need a unit last stride (tracing may hand the
    # real kernel a layout the fake tensor did not promise).
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------ custom ops
@_backend.custom_op("qwen3_fast::qk_norm_rope_fwd")
def _qk_norm_rope_fwd(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                      sin: Tensor, positions: Tensor, eps: float,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return qk_norm_rope_forward(_heads_major(q), _heads_major(k), q_weight.contiguous(),
                                k_weight.contiguous(), cos.contiguous(), sin.contiguous(),
                                positions.contiguous(), eps, backend)


@_qk_norm_rope_fwd.register_fake
def _(q, k, q_weight, k_weight, cos, sin, positions, eps, backend):
    return (q.new_empty(q.shape, dtype=q_weight.dtype), k.new_empty(k.shape, dtype=k_weight.dtype),
            q.new_empty(q.shape[:2], dtype=torch.float32),
            k.new_empty(k.shape[:2], dtype=torch.float32))


@torch.library.custom_op("qwen3_fast::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor,
                      k_weight: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                      q_rstd: Tensor, k_rstd: Tensor,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return qk_norm_rope_backward(dq_out, dk_out, _heads_major(q), _heads_major(k),
                                 q_weight.contiguous(), k_weight.contiguous(), cos.contiguous(),
                                 sin.contiguous(), positions.contiguous(), q_rstd.contiguous(),
                                 k_rstd.contiguous(), backend)


@_qk_norm_rope_bwd.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, positions, q_rstd, k_rstd, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q_weight.new_empty(q_weight.shape),
            k_weight.new_empty(k_weight.shape))


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, positions, _eps, backend = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, positions, output[2], output[3])
    ctx.backend = backend


def _backward(ctx, dq_out, dk_out, _dq_rstd, _dk_rstd):
    q, k, q_weight, k_weight, cos, sin, positions, q_rstd, k_rstd = ctx.saved_tensors
    dq, dk, dqw, dkw = _qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin,
                                         positions, q_rstd, k_rstd, ctx.backend)
    return dq, dk, dqw, dkw, None, None, None, None, None


torch.library.register_autograd("qwen3_fast::qk_norm_rope_fwd", _backward, setup_context=_setup)


@torch.library.custom_op("qwen3_fast::qk_norm_rope_", mutates_args=("q", "k"))
def _qk_norm_rope_(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                   sin: Tensor, positions: Tensor, eps: float, backend: str) -> None:
    qk_norm_rope_inplace(q, k, q_weight.contiguous(), k_weight.contiguous(), cos.contiguous(),
                         sin.contiguous(), positions.contiguous(), eps, backend)


@_qk_norm_rope_.register_fake
def _(q, k, q_weight, k_weight, cos, sin, positions, eps, backend):
    return None


# ------------------------------------------------------------------ public ops
def check_inputs(q: object, k: object, q_weight: object, k_weight: object, cos: object,
                 sin: object, positions: object, eps: object) -> int:
    """Validate qk_norm_rope inputs (metadata only); returns head_dim."""
    _checks.check_tensor(q, "q", min_ndim=3)
    _checks.check_tensor(k, "k", min_ndim=3)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [T, Hq, D] or [B, S, Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected the leading dims of q "
                         f"{tuple(q.shape[:-2])} plus [Hkv, D]")
    head_dim = q.shape[-1]
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"q has head_dim {head_dim}; expected an even size > 0")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[-1]}; expected q's head_dim {head_dim}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"q and k need at least one head, got shapes {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    _checks.check_same_device(q, "q", k, "k")
    _checks.check_same_dtype(q, "q", k, "k")
    for name, x in (("q", q), ("k", k)):
        if x.stride(-1) != 1 and x.numel() > head_dim:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got "
                             f"strides {tuple(x.stride())}; call .contiguous() first")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        _checks.check_tensor(w, name, ndim=1)
        if w.shape[0] != head_dim:
            raise ValueError(f"{name} has shape {tuple(w.shape)}; expected [{head_dim}]")
        _checks.check_same_device(q, "q", w, name)
        _checks.check_weight_dtype(w, q, name)
    _checks.check_same_dtype(q_weight, "q_weight", k_weight, "k_weight")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(t, name, ndim=2)
        if t.shape[1] != head_dim:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [P, {head_dim}]")
        if t.shape[0] == 0:
            raise ValueError(f"{name} has no rows (shape {tuple(t.shape)}); expected [P, "
                             f"{head_dim}] with P > 0")
        _checks.check_same_device(q, "q", t, name)
    if cos.shape != sin.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)}; expected cos's shape {tuple(cos.shape)}")
    if not isinstance(positions, Tensor) or positions.dtype not in POSITION_DTYPES:
        raise TypeError("positions must be an int32/int64 tensor, got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.shape != q.shape[:-2]:
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected q's leading "
                         f"dims {tuple(q.shape[:-2])}")
    _checks.check_same_device(q, "q", positions, "positions")
    _checks.check_eps(eps)
    return head_dim


def _check_position_range(positions: Tensor, max_pos: int) -> None:
    """Data-dependent check for the reference path (skipped while torch.compile traces or a
    CUDA graph captures: a host read cannot be captured, generate/graph_step.py)."""
    if positions.numel() == 0 or torch.compiler.is_compiling():
        return
    if positions.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= max_pos:
        bad = lo if lo < 0 else hi
        raise ValueError(f"positions: value {bad} is out of range [0, {max_pos}) (cos/sin have "
                         f"{max_pos} rows)")


def _flat(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q.flatten(0, -3), k.flatten(0, -3), positions.reshape(-1)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                 sin: Tensor, positions: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """QK-norm then RoPE, HF-exact (``Qwen3RMSNorm`` on q and k, then ``apply_rotary_pos_emb``).

    Parameters
    ----------
    q : [T, Hq, D] or [B, S, Hq, D];  k : [T, Hkv, D] or [B, S, Hkv, D] (same leading dims,
        same dtype; unit stride in D, other strides free)
    q_weight, k_weight : [D] RMSNorm weights, q's dtype or float32 (both the same)
    cos, sin : [P, D] tables from :func:`qwen3_fast.ops.rope_cache` (any float dtype; the
        kernels read them as float32, which is exact)
    positions : [T] or [B, S] int32/int64, each in [0, P) (packed and ragged batches: any
        position per token)
    eps : RMSNorm epsilon

    Returns (q_out, k_out) with q's and k's shapes in the weights' dtype (HF promotes bf16
    activations times float32 weights to float32). Differentiable in q, k and the weights.
    """
    head_dim = check_inputs(q, k, q_weight, k_weight, cos, sin, positions, eps)
    backend = _backend.resolve("qk_norm_rope", q)
    if backend == "reference" or q.dtype == torch.float64:
        _check_position_range(positions, cos.shape[0])
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, positions, eps)
    qf, kf, pf = _flat(q, k, positions)
    q_out, k_out, _, _ = _backend.call_op(_qk_norm_rope_fwd, qf, kf, q_weight, k_weight,
                                          cos.float(), sin.float(), pf, float(eps), backend)
    return q_out.view(*q.shape[:-1], head_dim), k_out.view(*k.shape[:-1], head_dim)


def qk_norm_rope_(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                  sin: Tensor, positions: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """In-place :func:`qk_norm_rope` for inference: writes the result into q and k and returns
    them. No autograd. The weights must have q's dtype (the output dtype is q's), and q and k
    must flatten to [N, H, D] without a copy (any [B, S, H, D] view of a projection does)."""
    check_inputs(q, k, q_weight, k_weight, cos, sin, positions, eps)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {w.dtype}; the in-place qk_norm_rope_ writes into "
                            f"q, so it needs q's dtype {q.dtype}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("qk_norm_rope_ is for inference (no autograd); q or k requires grad: "
                           "use qk_norm_rope, or call this under torch.no_grad()")
    backend = _backend.resolve("qk_norm_rope", q)
    if backend == "reference" or q.dtype == torch.float64:
        _check_position_range(positions, cos.shape[0])
        q_out, k_out = reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, positions, eps)
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    for name, x in (("q", q), ("k", k)):
        try:
            x.view(-1, *x.shape[-2:])
        except RuntimeError as e:
            raise ValueError(f"{name} (shape {tuple(x.shape)}, strides {tuple(x.stride())}) cannot "
                             "be viewed as [N, H, D] for the in-place op; use qk_norm_rope") from e
    qf, kf, pf = _flat(q, k, positions)
    _qk_norm_rope_(qf, kf, q_weight, k_weight, cos.float(), sin.float(), pf, float(eps), backend)
    return q, k
