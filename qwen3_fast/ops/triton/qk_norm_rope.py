"""Fused QK-norm + RoPE in Triton: ``qk_norm_rope_forward`` / ``_inplace`` / ``_backward``.

Same contract and rounding as csrc/cpu/qk_norm_rope.cpp (HF order, TX = q/k dtype, TW =
weight dtype = output dtype): ``y = round_TW(w * round_TX(x * rstd))``, ``c, s`` = cos/sin
at the token's position rounded to TW, ``out = round_TW(round_TW(y * c) +
round_TW(rotate_half(y) * s))``. One program holds all heads of one token as a
[BLOCK_H, BLOCK_D] tile (cos/sin read once per token); the rotation partner of column i
(i + D/2 or i - D/2) is loaded and normalized again rather than shuffled in registers.
q and k take one launch each. A token whose position is outside [0, P) reads no table row
and gets NaN outputs (the CPU kernel raises instead; a GPU kernel cannot without a sync).

The backward walks a fixed grid of programs over tokens (Liger-Kernel style, as
ops/triton/rms_norm.py), recomputes the normalized values from x and rstd, keeps the
dweight partial of its tokens in registers and writes one float32 row; torch sums them.

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_triton_qk_norm_rope.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen3_fast.ops.triton.rms_norm import _num_programs, _round_to


@triton.jit
def _qk_norm_rope_forward_kernel(x_ptr, x_ts, x_hs, w_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr,
                                 o_ts, o_hs, rstd_ptr, n_heads, head_dim, half, max_pos, eps,
                                 HAS_RSTD: tl.constexpr, BLOCK_H: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    """One token, all its heads: out[t, h] = rope(norm(x[t, h])) at positions[t]."""
    t = tl.program_id(0).to(tl.int64)
    h1 = tl.arange(0, BLOCK_H)
    d1 = tl.arange(0, BLOCK_D)
    p1 = tl.where(d1 < half, d1 + half, d1 - half)  # rotation partner column
    dmask = d1 < head_dim
    mask = (h1[:, None] < n_heads) & dmask[None, :]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    valid = (pos >= 0) & (pos < max_pos)
    row = tl.where(valid, pos, 0) * head_dim
    c = _round_to(tl.load(cos_ptr + row + d1, mask=dmask, other=0.0), out_ptr)
    s = _round_to(tl.load(sin_ptr + row + d1, mask=dmask, other=0.0), out_ptr)
    w = tl.load(w_ptr + d1, mask=dmask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + p1, mask=dmask, other=0.0).to(tl.float32)
    base = x_ptr + t * x_ts + h1[:, None].to(tl.int64) * x_hs
    x = tl.load(base + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + p1[None, :], mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / head_dim
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))  # [BLOCK_H]
    y = _round_to(w[None, :] * _round_to(x * rstd[:, None], x_ptr), out_ptr)
    yp = _round_to(wp[None, :] * _round_to(xp * rstd[:, None], x_ptr), out_ptr)
    sign = tl.where(d1 < half, -1.0, 1.0)  # rotate_half(y)[i] = sign * y[partner]
    out = _round_to(_round_to(y * c[None, :], out_ptr)
                    + _round_to((sign[None, :] * yp) * s[None, :], out_ptr), out_ptr)
    out = tl.where(valid, out, float("nan"))
    obase = out_ptr + t * o_ts + h1[:, None].to(tl.int64) * o_hs
    tl.store(obase + d1[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_RSTD:
        tl.store(rstd_ptr + t * n_heads + h1, rstd, mask=h1 < n_heads)


@triton.jit
def _qk_norm_rope_backward_kernel(g_ptr, x_ptr, x_ts, x_hs, w_ptr, cos_ptr, sin_ptr, pos_ptr,
                                  rstd_ptr, dx_ptr, dw_partial_ptr, n_tokens, n_heads, head_dim,
                                  half, max_pos, tokens_per_program, BLOCK_H: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    """Tokens [pid * tokens_per_program, ...): dy = rotation^T(dout) (rounded like torch's
    autograd of the unfused ops), dx = rstd * (dy w - n mean(dy w n)), dw += dy round_TX(n)."""
    pid = tl.program_id(0)
    t_start = pid * tokens_per_program
    t_end = tl.minimum(t_start + tokens_per_program, n_tokens)
    h1 = tl.arange(0, BLOCK_H)
    d1 = tl.arange(0, BLOCK_D)
    p1 = tl.where(d1 < half, d1 + half, d1 - half)
    dmask = d1 < head_dim
    hmask = h1 < n_heads
    mask = hmask[:, None] & dmask[None, :]
    start = t_start.to(tl.int64)
    # Walk tokens by advancing pointers (the interpreter's loop index is a plain int).
    x_ptr += start * x_ts
    g_ptr += start * n_heads * head_dim
    dx_ptr += start * n_heads * head_dim
    rstd_ptr += start * n_heads
    pos_ptr += start
    w = tl.load(w_ptr + d1, mask=dmask, other=0.0).to(tl.float32)
    sign = tl.where(d1 < half, 1.0, -1.0)  # dy[i] += sign * dout[partner] * s[partner]
    xoff = h1[:, None].to(tl.int64) * x_hs + d1[None, :]
    goff = h1[:, None] * head_dim + d1[None, :]
    gpoff = h1[:, None] * head_dim + p1[None, :]
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for _ in range(t_start, t_end):
        pos = tl.load(pos_ptr).to(tl.int64)
        row = tl.where((pos >= 0) & (pos < max_pos), pos, 0) * head_dim
        c = _round_to(tl.load(cos_ptr + row + d1, mask=dmask, other=0.0), g_ptr)
        sp = _round_to(tl.load(sin_ptr + row + p1, mask=dmask, other=0.0), g_ptr)
        g = tl.load(g_ptr + goff, mask=mask, other=0.0).to(tl.float32)
        gp = tl.load(g_ptr + gpoff, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + h1, mask=hmask, other=0.0)
        dy = _round_to(_round_to(g * c[None, :], g_ptr)
                       + _round_to((sign[None, :] * gp) * sp[None, :], g_ptr), g_ptr)
        n = x * rstd[:, None]
        dn = dy * w[None, :]
        mean_dot = tl.sum(dn * n, axis=1) / head_dim
        dx = _round_to(rstd[:, None] * (dn - n * mean_dot[:, None]), dx_ptr)
        tl.store(dx_ptr + goff, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += dy * _round_to(n, x_ptr)
        x_ptr += x_ts
        g_ptr += n_heads * head_dim
        dx_ptr += n_heads * head_dim
        rstd_ptr += n_heads
        pos_ptr += 1
    tl.store(dw_partial_ptr + pid.to(tl.int64) * head_dim + d1, tl.sum(acc, axis=0), mask=dmask)


def _blocks(heads: int, head_dim: int) -> tuple[int, int, int]:
    block_h = max(1, triton.next_power_of_2(heads))
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = block_h * block_d
    num_warps = 16 if tile >= 16384 else 8 if tile >= 4096 else 4
    return block_h, block_d, num_warps


def _forward_one(x, w, cos, sin, positions, out, rstd, eps):
    n, heads, d = x.shape
    if n == 0:
        return
    block_h, block_d, num_warps = _blocks(heads, d)
    _qk_norm_rope_forward_kernel[(n,)](
        x, x.stride(0), x.stride(1), w, cos, sin, positions, out, out.stride(0), out.stride(1),
        rstd if rstd is not None else out, heads, d, d // 2, cos.shape[0], float(eps),
        HAS_RSTD=rstd is not None, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps)


def qk_norm_rope_forward(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                         sin: Tensor, positions: Tensor,
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q [N, Hq, D], k [N, Hkv, D] (unit last stride), weights [D], cos/sin [P, D] float32
    contiguous, positions [N] -> (q_out, k_out in the weights' dtype, q_rstd [N, Hq],
    k_rstd [N, Hkv] float32)."""
    q_out = torch.empty(q.shape, dtype=q_weight.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k_weight.dtype, device=q.device)
    q_rstd = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    k_rstd = torch.empty(k.shape[:2], dtype=torch.float32, device=q.device)
    _forward_one(q, q_weight, cos, sin, positions, q_out, q_rstd, eps)
    _forward_one(k, k_weight, cos, sin, positions, k_out, k_rstd, eps)
    return q_out, k_out, q_rstd, k_rstd


def qk_norm_rope_inplace(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                         sin: Tensor, positions: Tensor, eps: float) -> None:
    """The forward written into q and k (weights in q's dtype); no rstd."""
    _forward_one(q, q_weight, cos, sin, positions, q, None, eps)
    _forward_one(k, k_weight, cos, sin, positions, k, None, eps)


def _backward_one(g, x, w, cos, sin, positions, rstd):
    n, heads, d = x.shape
    dx = torch.empty((n, heads, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return dx, torch.zeros((d,), dtype=w.dtype, device=x.device)
    block_h, block_d, num_warps = _blocks(heads, d)
    programs = _num_programs(x.device, n)
    tokens_per_program = triton.cdiv(n, programs)
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _qk_norm_rope_backward_kernel[(programs,)](
        g, x, x.stride(0), x.stride(1), w, cos, sin, positions, rstd, dx, dw_partial, n, heads,
        d, d // 2, cos.shape[0], tokens_per_program, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps)
    return dx, dw_partial.sum(0).to(w.dtype)


def qk_norm_rope_backward(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor,
                          k_weight: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                          q_rstd: Tensor, k_rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq_out/dk_out contiguous in the weights' dtype -> (dq, dk in q's dtype, dq_weight,
    dk_weight in the weights' dtype)."""
    dq, dqw = _backward_one(dq_out, q, q_weight, cos, sin, positions, q_rstd)
    dk, dkw = _backward_one(dk_out, k, k_weight, cos, sin, positions, k_rstd)
    return dq, dk, dqw, dkw
