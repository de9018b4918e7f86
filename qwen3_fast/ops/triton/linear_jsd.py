"""Generalized JSD over one chunk of student/teacher logits in Triton, for ops/linear_jsd.py.

As in the fused cross-entropy, the GEMMs of a chunk stay in torch; this kernel does the
part between them. Per row, streaming over the vocabulary BLOCK columns at a time (a row is
never held whole):

1. online log-sum-exp of the student and of the teacher logits (both / temperature);
2. the divergence: forward KL (beta = 0), reverse KL (beta = 1) or both KL(P_T||M) and
   KL(P_S||M) of the mixture M (log M by a stable logaddexp);
3. if a gradient is wanted, the gradient w.r.t. the RAW student logits, times the row's
   multiplier, written over the student logits IN PLACE (see ops/linear_jsd.py for the
   formulas), so a chunk needs no buffer beyond the two logits.

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_linear_jsd.py``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2


@triton.jit
def _jsd_rows_kernel(s_ptr, s_stride, t_ptr, t_stride, valid_ptr, scale_ptr, loss_ptr, n_cols,
                     inv_temp, beta, log_1mb, log_b, MODE: tl.constexpr,
                     NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: loss[r] = divergence (0 when not valid); if NEED_GRAD,
    s[r, :] <- d loss / d s_raw * scale[r] (0 when not valid)."""
    row = tl.program_id(0).to(tl.int64)
    s_base = s_ptr + row * s_stride
    t_base = t_ptr + row * t_stride
    valid = tl.load(valid_ptr + row) != 0
    cols = tl.arange(0, BLOCK)
    # pass 1: online max and sum of exp, student and teacher
    ms = tl.full((), float("-inf"), tl.float32)
    mt = tl.full((), float("-inf"), tl.float32)
    ss = tl.zeros((), dtype=tl.float32)
    st = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        xs = tl.load(s_base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        xt = tl.load(t_base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        xs = xs * inv_temp
        xt = xt * inv_temp
        ms_new = tl.maximum(ms, tl.max(xs, axis=0))
        mt_new = tl.maximum(mt, tl.max(xt, axis=0))
        ss = ss * tl.exp(ms - ms_new) + tl.sum(tl.exp(xs - ms_new), axis=0)
        st = st * tl.exp(mt - mt_new) + tl.sum(tl.exp(xt - mt_new), axis=0)
        ms = ms_new
        mt = mt_new
    lse_s = ms + tl.log(ss)
    lse_t = mt + tl.log(st)
    # pass 2: the divergence (acc_s: KL(P_S||.) part, acc_t: KL(P_T||.) part)
    acc_s = tl.zeros((), dtype=tl.float32)
    acc_t = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        lps = tl.load(s_base + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        lpt = tl.load(t_base + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        lps = lps - lse_s
        lpt = lpt - lse_t
        if MODE == 0:
            acc_t += tl.sum(tl.where(mask, tl.exp(lpt) * (lpt - lps), 0.0), axis=0)
        elif MODE == 1:
            acc_s += tl.sum(tl.where(mask, tl.exp(lps) * (lps - lpt), 0.0), axis=0)
        else:
            a = lps + log_1mb
            b = lpt + log_b
            mx = tl.maximum(a, b)
            lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
            acc_s += tl.sum(tl.where(mask, tl.exp(lps) * (lps - lm), 0.0), axis=0)
            acc_t += tl.sum(tl.where(mask, tl.exp(lpt) * (lpt - lm), 0.0), axis=0)
    if MODE == 0:
        loss = acc_t
    elif MODE == 1:
        loss = acc_s
    else:
        loss = beta * acc_t + (1.0 - beta) * acc_s
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if NEED_GRAD:
        # pass 3: the gradient w.r.t. the raw logits (d/ds / temperature), over s
        g_scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0) * inv_temp
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            lps = tl.load(s_base + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_s
            lpt = tl.load(t_base + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_t
            if MODE == 0:
                g = tl.exp(lps) - tl.exp(lpt)
            elif MODE == 1:
                g = tl.exp(lps) * (lps - lpt - acc_s)
            else:
                a = lps + log_1mb
                b = lpt + log_b
                mx = tl.maximum(a, b)
                lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                g = (1.0 - beta) * tl.exp(lps) * (lps - lm - acc_s)
            tl.store(s_base + idx, g * g_scale, mask=mask)


def jsd_rows_(s: Tensor, t: Tensor, valid: Tensor, scale: Tensor, beta: float,
              temperature: float, need_grad: bool) -> Tensor:
    """Per-row generalized JSD of a logits chunk and, optionally, its gradient in place.

    Parameters
    ----------
    s : Tensor, shape [C, V], float32, unit column stride: raw student logits; if
        need_grad, overwritten with ``d rows / d s * scale`` (0 on rows not valid)
    t : Tensor, shape [C, V], float32: raw teacher logits (read only)
    valid : Tensor, shape [C], bool: rows that count
    scale : Tensor, shape [C], float32: the gradient multiplier per row
    beta : float in [0, 1]; temperature : float > 0
    need_grad : whether to write the gradient

    Returns
    -------
    Tensor, shape [C], float32: the divergence per row (0 on rows not valid), unscaled.
    """
    rows, cols = s.shape
    loss = torch.empty((rows,), dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    mode = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else MIXTURE
    log_1mb = math.log1p(-beta) if mode == MIXTURE else 0.0
    log_b = math.log(beta) if mode == MIXTURE else 0.0
    block = min(4096, max(16, triton.next_power_of_2(cols)))
    num_warps = 8 if block >= 2048 else 4
    _jsd_rows_kernel[(rows,)](s, s.stride(0), t, t.stride(0), valid.to(torch.int8), scale,
                              loss, cols, 1.0 / temperature, float(beta), log_1mb, log_b,
                              MODE=mode, NEED_GRAD=bool(need_grad), BLOCK=block,
                              num_warps=num_warps)
    return loss
