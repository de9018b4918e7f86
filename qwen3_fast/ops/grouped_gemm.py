"""Grouped GEMM: ``grouped_gemm(a, b, offsets, trans_b=False)``.

For each group (expert) e, rows offsets[e]:offsets[e+1] of a [M, K] times b[e]
(b [E, K, N], or [E, N, K] used transposed when ``trans_b``) -> c [M, N]. Rows outside
[offsets[0], offsets[E]) are zero. Empty groups are fine.

Backward: da = grouped_gemm(dc, b, offsets, not trans_b) (the other transpose) and
db[e] = a_e^T dc_e ([K, N]) or dc_e^T a_e ([N, K] when trans_b), a grouped GEMM whose
reduction length (the group's row count) differs per group (:func:`grouped_gemm_wgrad`).
Saved for backward: a and b (inputs, alive anyway) and offsets.

Backends: ``cpu`` runs one torch matmul per non-empty group into slices of one output.
That is deliberate: MKL/oneDNN are the well-kept CPU GEMMs and a group's matmul is a
plain dense GEMM. The exception is bfloat16 on CPUs with AVX512-BF16 (both
trans_b forms): there csrc/cpu/grouped_gemm.cpp does all groups in one parallel loop,
because oneDNN's per-call weight reorder and per-shape kernel builds dominate at ~32 rows
per expert (measured in bench/bench_moe.py). The weight gradient stays on torch matmul. ``triton``:
ops/triton/grouped_gemm.py (one launch, each program finds its group from offsets).
``cuda``: csrc/cuda/grouped_gemm.cu (a shared-memory tiled kernel for sm_80+, each block
finds its group from the device offsets: no host sync; the CUTLASS 3.x sm_90a kernel the
issue asks for is not written yet).
``reference``: the per-group loop of ops/reference.py. Shapes: M rows (T*K slots),
K reduction, N output columns, E groups.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr


_NT_BF16: list[bool] = []


def _nt_bf16_kernel() -> bool:
    """Whether _C has the AVX512-BF16 grouped GEMM (built with it, on this CPU)."""
    if not _NT_BF16:
        from qwen3_fast import _ext

        _NT_BF16.append(bool(_ext.available() and getattr(
            _ext.extension(), "grouped_gemm_nt_bf16_available", lambda: False)()))
    return _NT_BF16[0]


def _bounds(offsets: Tensor) -> list[int]:
    # A host copy of E+1 integers: free on the CPU; GPU backends never call this.
    return offsets.tolist()


# ------------------------------------------------------------------ one backend
def grouped_gemm_forward(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool,
                         backend: str) -> Tensor:
    """a [M, K] contiguous, b [E, K, N] / [E, N, K] contiguous -> c [M, N]."""
    if backend == "reference":
        return reference.grouped_gemm(a, b, offsets, trans_b)
    if backend == "triton":
        from qwen3_fast.ops.triton.grouped_gemm import grouped_gemm as triton_gemm

        return triton_gemm(a, b, offsets, trans_b)
    n = b.shape[1] if trans_b else b.shape[2]
    if backend == "cuda":
        c = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
        _cuda_grouped_gemm(a, b, offsets, c, trans_b)
        return c
    bounds = _bounds(offsets)
    c = a.new_empty((a.shape[0], n))
    c[:bounds[0]].zero_()
    c[bounds[-1]:].zero_()
    if a.dtype == torch.bfloat16 and _nt_bf16_kernel():
        # csrc/cpu/grouped_gemm.cpp: one parallel loop over all experts (see its comment);
        # NT for the forward GEMMs, NN for the backward's dx and dy @ W_down.
        launch("cpu", "grouped_gemm_nt_bf16" if trans_b else "grouped_gemm_nn_bf16", a.device,
               ptr(a), ptr(b), ptr(offsets), ptr(c), a.shape[0], n, a.shape[1], b.shape[0])
        return c
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.matmul(a[lo:hi], b[e].t() if trans_b else b[e], out=c[lo:hi])
    return c


def grouped_gemm_wgrad(a: Tensor, dc: Tensor, offsets: Tensor, trans_b: bool,
                       num_groups: int, backend: str) -> Tensor:
    """db for c = grouped_gemm(a, b, offsets, trans_b): a [M, K], dc [M, N] ->
    db [E, N, K] (trans_b) or [E, K, N]; zero for empty groups. K_e = group rows."""
    k, n = a.shape[1], dc.shape[1]
    shape = (num_groups, n, k) if trans_b else (num_groups, k, n)
    if backend == "triton":
        from qwen3_fast.ops.triton.grouped_gemm import grouped_gemm_wgrad as triton_wgrad

        return triton_wgrad(a, dc, offsets, trans_b, num_groups)
    if backend == "cuda":
        db = torch.empty(shape, dtype=a.dtype, device=a.device)
        _cuda_grouped_wgrad(*((dc, a) if trans_b else (a, dc)), offsets, db)
        return db
    db = a.new_empty(shape)
    bounds = _bounds(offsets)
    for e in range(num_groups):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            db[e].zero_()
        elif trans_b:
            torch.matmul(dc[lo:hi].t(), a[lo:hi], out=db[e])
        else:
            torch.matmul(a[lo:hi].t(), dc[lo:hi], out=db[e])
    return db


def _cuda_grouped_gemm(a, b, offsets, c, trans_b):
    # offsets stay on the device: the kernel finds each tile's group itself (no host sync)
    launch("cuda", "grouped_gemm", a.device, ptr(a), ptr(b), ptr(offsets), ptr(c), a.shape[0],
           c.shape[1], a.shape[1], b.shape[0], bool(trans_b), code(a))


def _cuda_grouped_wgrad(x, y, offsets, out):
    launch("cuda", "grouped_gemm_wgrad", x.device, ptr(x), ptr(y), ptr(offsets), ptr(out),
           x.shape[0], x.shape[1], y.shape[1], out.shape[0], code(x))


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("qwen3_fast::grouped_gemm_fwd", mutates_args=())
def _grouped_gemm_fwd(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool,
                      backend: str) -> Tensor:
    return grouped_gemm_forward(a.contiguous(), b.contiguous(), offsets, trans_b, backend)


@_grouped_gemm_fwd.register_fake
def _(a, b, offsets, trans_b, backend):
    return a.new_empty((a.shape[0], b.shape[1] if trans_b else b.shape[2]))


@torch.library.custom_op("qwen3_fast::grouped_gemm_wgrad", mutates_args=())
def _grouped_gemm_wgrad(a: Tensor, dc: Tensor, offsets: Tensor, trans_b: bool, num_groups: int,
                        backend: str) -> Tensor:
    return grouped_gemm_wgrad(a.contiguous(), dc.contiguous(), offsets, trans_b, num_groups,
                              backend)


@_grouped_gemm_wgrad.register_fake
def _(a, dc, offsets, trans_b, num_groups, backend):
    k, n = a.shape[1], dc.shape[1]
    return a.new_empty((num_groups, n, k) if trans_b else (num_groups, k, n))


def _setup(ctx, inputs, output):
    a, b, offsets, trans_b, backend = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b, ctx.backend = trans_b, backend


def _backward(ctx, dc):
    a, b, offsets = ctx.saved_tensors
    da = db = None
    if ctx.needs_input_grad[0]:
        # c = a B (B = b[e] or b[e]^T)  =>  da = dc B^T: the same grouped GEMM, other transpose
        da = _grouped_gemm_fwd(dc, b, offsets, not ctx.trans_b, ctx.backend)
    if ctx.needs_input_grad[1]:
        db = _grouped_gemm_wgrad(a, dc, offsets, ctx.trans_b, b.shape[0], ctx.backend)
    return da, db, None, None, None


torch.library.register_autograd("qwen3_fast::grouped_gemm_fwd", _backward, setup_context=_setup)


# ------------------------------------------------------------------ public
def check_offsets(offsets: object, num_groups: int, rows: int, name: str = "offsets") -> Tensor:
    """offsets must be [E+1] int64, non-decreasing, within [0, rows] (values checked on CPU)."""
    _checks.check_tensor(offsets, name, dtypes=(torch.int64,), ndim=1)
    if offsets.shape[0] != num_groups + 1:
        raise ValueError(f"{name} has {offsets.shape[0]} entries; expected E+1 = {num_groups + 1} "
                         f"(one more than the expert count of b)")
    # Reading values would sync a GPU; device kernels clamp each group to [0, rows] instead.
    if offsets.device.type == "cpu":
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing (monotone), got {offsets.tolist()}")
        if int(offsets[0]) < 0 or int(offsets[-1]) > rows:
            raise ValueError(f"{name} values must lie in [0, {rows}] (the rows of a), got "
                             f"first {int(offsets[0])}, last {int(offsets[-1])}")
    return offsets


def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
    """Per-group matrix product.

    Parameters
    ----------
    a : [M, K] float32/float16/bfloat16/float64
    b : [E, K, N], or [E, N, K] when ``trans_b`` (a's dtype and device)
    offsets : [E+1] int64, non-decreasing; group e owns rows offsets[e]:offsets[e+1]
    trans_b : use b[e]^T

    Returns
    -------
    c : [M, N] in a's dtype, c[rows of e] = a[rows of e] @ b[e] (or b[e]^T); other rows 0.
    Differentiable w.r.t. a and b.
    """
    _checks.check_tensor(a, "a", ndim=2)
    _checks.check_tensor(b, "b", ndim=3)
    _checks.check_same_dtype(a, "a", b, "b")
    _checks.check_same_device(a, "a", b, "b")
    if not isinstance(trans_b, bool):
        raise TypeError(f"trans_b must be a bool, got {type(trans_b).__name__}")
    k_b = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != k_b:
        raise ValueError(f"b has shape {tuple(b.shape)}; expected the reduction size K = "
                         f"{a.shape[1]} (a's columns) in dim {2 if trans_b else 1} "
                         f"(trans_b={trans_b})")
    _checks.check_same_device(a, "a", offsets, "offsets")
    check_offsets(offsets, b.shape[0], a.shape[0])
    backend = _backend.resolve("grouped_gemm", a)
    return _grouped_gemm_fwd(a, b, offsets, trans_b, backend)
