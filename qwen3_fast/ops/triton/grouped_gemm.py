"""Grouped GEMM in Triton: ``grouped_gemm(a, b, offsets, trans_b)`` and its weight gradient
``grouped_gemm_wgrad(a, dc, offsets, trans_b, num_groups)``.

Forward: one launch over (row tiles, column tiles). The row-tile axis has an upper bound
known without reading offsets (cdiv(M, BM) + E: each group adds at most one partial
tile), so no host sync; each program walks offsets to find the group that owns its row
tile and exits when none does. Rows outside [offsets[0], offsets[E]) are zero (the output
starts zeroed). Weight gradient: one program per (group, output tile); it reduces over
that group's rows, so the reduction length differs per group (zero for empty groups).
fp32 accumulation with tl.dot, one rounding to the output dtype. Runs under
TRITON_INTERPRET=1 on CPU tensors (python_tests/ops/test_grouped_gemm.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, off_ptr, c_ptr, N, K, E,
                         TRANS_B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, DOT_F32: tl.constexpr):
    """c[rows of g] = a[rows of g] @ (b[g]^T if TRANS_B else b[g]); a [M, K], c [M, N]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # find the group owning row tile pid_m: tiles are numbered group by group
    # int64 from the start: they take values loaded from the int64 offsets, and a compiled
    # loop-carried variable may not change type (the interpreter does not check this)
    group = -1
    row0 = tl.zeros((), dtype=tl.int64)
    row_end = tl.zeros((), dtype=tl.int64)
    seen = tl.zeros((), dtype=tl.int64)
    for e in range(0, E):
        lo = tl.load(off_ptr + e)
        hi = tl.load(off_ptr + e + 1)
        tiles = (hi - lo + BM - 1) // BM
        hit = (pid_m >= seen) & (pid_m < seen + tiles)
        group = tl.where(hit, e, group)
        row0 = tl.where(hit, lo + (pid_m - seen) * BM, row0)
        row_end = tl.where(hit, hi, row_end)
        seen += tiles
    if group >= 0:
        rows = (row0 + tl.arange(0, BM)).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        row_ok = rows < row_end
        col_ok = cols < N
        b_base = b_ptr + group.to(tl.int64) * N * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a_t = tl.load(a_ptr + rows[:, None] * K + ks[None, :],
                          mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if TRANS_B:  # b[g] is [N, K]
                b_t = tl.load(b_base + cols[None, :] * K + ks[:, None],
                              mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            else:  # b[g] is [K, N]
                b_t = tl.load(b_base + ks[:, None] * N + cols[None, :],
                              mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(a_t.to(tl.float32), b_t.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a_t, b_t)
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(x_ptr, y_ptr, off_ptr, out_ptr, P, Q,
                          BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
                          DOT_F32: tl.constexpr):
    """out[g] = x[rows of g]^T @ y[rows of g]; x [M, P], y [M, Q], out [E, P, Q]."""
    g = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_q = tl.cdiv(Q, BQ)
    ps = (pid // tiles_q) * BP + tl.arange(0, BP)
    qs = (pid % tiles_q) * BQ + tl.arange(0, BQ)
    p_ok = ps < P
    q_ok = qs < Q
    lo = tl.load(off_ptr + g)
    hi = tl.load(off_ptr + g + 1)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        rows = (r0 + tl.arange(0, BR)).to(tl.int64)
        r_ok = rows < hi
        x_t = tl.load(x_ptr + rows[None, :] * P + ps[:, None],  # [BP, BR] = x^T tile
                      mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        y_t = tl.load(y_ptr + rows[:, None] * Q + qs[None, :],
                      mask=r_ok[:, None] & q_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(x_t.to(tl.float32), y_t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x_t, y_t)
    out = out_ptr + g.to(tl.int64) * P * Q
    tl.store(out + ps[:, None] * Q + qs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & q_ok[None, :])


def _dot_f32(t: Tensor) -> bool:
    # The interpreter's tl.dot mishandles 16-bit float tiles (numpy has no bfloat16), so
    # on CPU tensors the tiles are upcast first; on a GPU tl.dot takes them as they are.
    return t.device.type == "cpu" or t.dtype == torch.float32


def _blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    # 64x64x32 tiles: fits every GPU's shared memory at 2 stages in bf16 and fp32
    return 64, 64, 32


def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool) -> Tensor:
    """a [M, K] contiguous, b [E, K, N] ([E, N, K] if trans_b) contiguous -> c [M, N]."""
    m, k = a.shape
    e = b.shape[0]
    n = b.shape[1] if trans_b else b.shape[2]
    c = torch.zeros((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    bm, bn, bk = _blocks(a.dtype)
    grid = (triton.cdiv(m, bm) + e, triton.cdiv(n, bn))
    _grouped_gemm_kernel[grid](a, b, offsets, c, n, k, e, TRANS_B=bool(trans_b), BM=bm, BN=bn,
                               BK=bk, DOT_F32=_dot_f32(a))
    return c


def grouped_gemm_wgrad(a: Tensor, dc: Tensor, offsets: Tensor, trans_b: bool,
                       num_groups: int) -> Tensor:
    """db for c = grouped_gemm(a, b, offsets, trans_b): [E, N, K] (trans_b) or [E, K, N]."""
    x, y = (dc, a) if trans_b else (a, dc)
    p, q = x.shape[1], y.shape[1]
    out = torch.empty((num_groups, p, q), dtype=a.dtype, device=a.device)
    if num_groups == 0 or p == 0 or q == 0:
        return out
    bp, bq, br = 64, 64, 32
    grid = (num_groups, triton.cdiv(p, bp) * triton.cdiv(q, bq))
    _grouped_wgrad_kernel[grid](x, y, offsets, out, p, q, BP=bp, BQ=bq, BR=br,
                                DOT_F32=_dot_f32(x))
    return out
