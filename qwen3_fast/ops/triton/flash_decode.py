"""Flash-decoding in Triton over a dense or hierarchical (QuantSpec) KV cache layer.

Grid (B * Hkv, splits): a program takes the R = (Hq/Hkv) * n query rows of one kv head
(GQA, padded to a power of two >= 16 for tl.dot) and one chunk of that sequence's tokens,
runs an online softmax over blocks of BT tokens and writes a partial output and its
log-sum-exp; a second kernel (grid B * Hkv) merges the partials,
O = sum_s exp(lse_s - lse) O_s / sum_s exp(lse_s - lse), into the output. Each block reads
quantized codes where t < n_quant and the full-precision ring buffer (slot t % ring)
elsewhere, with masked loads, so both parts go through one pass; codes are dequantized in
registers (16U + L - 8 for 8-bit, 16U for 4-bit, times scale/16, plus min); key codes
are channel-major per group ([Tq/G, D, G/2], token pairs per byte), value codes token-major
([Tq, D/2], channel pairs per byte). Dense caches are
the buffer-only case (precision 16, ring = T). Ragged lengths: chunks past a sequence's
length exit early; the verify variant (n > 1) masks key t > p = length - n + i for row i,
and over a hierarchical cache row i reads codes only for t < nq_i (the quantized length at
p + 1, :func:`_row_quant_len` = reference.kv_row_quant_lengths) and the ring from there:
tokens in [nq_0, n_quant) get both a code and a ring score (a second, VERIFY-only dot on the
ring values, zero elsewhere) and each row picks its own.
Dot products use input_precision="ieee" (no TF32) so results match the fp32 reference.

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_triton_kv.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _row_quant_len(p, length, nq, G, ring):
    """Quantized prefix of the query at position p (kv_quant_math.h kv_row_quant_len):
    min(n_quant, max(G * max(0, ceil((p + 1 - 2G) / G)), G * ceil((length - ring) / G)))."""
    policy = tl.where(p > G, G * ((p - G) // G), 0)
    over = length - ring
    oldest = tl.where(over > 0, (over + G - 1) // G * G, 0)
    return tl.minimum(tl.maximum(policy, oldest), nq)


@triton.jit
def _flash_decode_kernel(q_ptr, ku_ptr, kl_ptr, kmin_ptr, ksc_ptr, vu_ptr, vl_ptr, vmin_ptr,
                         vsc_ptr, kbuf_ptr, vbuf_ptr, nq_ptr, len_ptr, o_ptr, lse_ptr,
                         Hq, Hkv, n_new, Tq, ring, G, Gv, chunk, n_splits, scale,
                         D: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr,
                         PREC: tl.constexpr, VERIFY: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    groups = Hq // Hkv
    R = groups * n_new
    length = tl.load(len_ptr + b)
    if PREC == 16:
        nq = 0
    else:
        nq = tl.load(nq_ptr + b)
    t_begin = split * chunk
    t_end = tl.minimum(t_begin + chunk, length)
    r = tl.arange(0, RP)
    d = tl.arange(0, D)
    rmask = r < R
    q = tl.load(q_ptr + ((b * Hq + h * groups) * n_new) * D + r[:, None] * D + d[None, :],
                mask=rmask[:, None], other=0.0).to(tl.float32) * scale
    limit = length - n_new + r % n_new
    if VERIFY:  # per-row quantized prefix; the ring holds every token >= the first row's
        nq_row = _row_quant_len(limit, length, nq, G, ring)
        nq_first = _row_quant_len(length - n_new, length, nq, G, ring)
    else:
        nq_first = nq
    m_i = tl.full([RP], -1.0e30, tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    half: tl.constexpr = D // 2
    for t0 in range(t_begin, t_end, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < t_end
        buf_rows = bh * ring + t % ring
        if PREC == 16:
            k = tl.load(kbuf_ptr + buf_rows[:, None] * D + d[None, :], mask=tmask[:, None],
                        other=0.0).to(tl.float32)
            v = tl.load(vbuf_ptr + buf_rows[:, None] * D + d[None, :], mask=tmask[:, None],
                        other=0.0).to(tl.float32)
        else:
            is_q = tmask & (t < nq)
            is_b = tmask & (t >= nq_first)
            qrow = bh * Tq + t
            shift = (d % 2) * 4
            boff = qrow[:, None] * half + (d // 2)[None, :]
            kgrp = bh * (Tq // G) + t // G  # keys: byte (group, channel, token pair)
            koff = (kgrp[:, None] * D + d[None, :]) * (G // 2) + ((t % G) // 2)[:, None]
            kshift = ((t % 2) * 4)[:, None]
            kmask = is_q[:, None]
            ub = (tl.load(ku_ptr + koff, mask=kmask, other=0).to(tl.int32) >> kshift) & 15
            if PREC == 8:
                lb = (tl.load(kl_ptr + koff, mask=kmask, other=0).to(tl.int32) >> kshift) & 15
                kc = 16 * ub + lb - 8
            else:
                kc = 16 * ub
            goff = (bh * (Tq // G) + t // G)[:, None] * D + d[None, :]
            ks = tl.load(ksc_ptr + goff, mask=is_q[:, None], other=0.0).to(tl.float32) * 0.0625
            km = tl.load(kmin_ptr + goff, mask=is_q[:, None], other=0.0).to(tl.float32)
            kq = kc.to(tl.float32) * ks + km
            kb = tl.load(kbuf_ptr + buf_rows[:, None] * D + d[None, :], mask=is_b[:, None],
                         other=0.0).to(tl.float32)
            k = tl.where(is_q[:, None], kq, kb)
            ub = (tl.load(vu_ptr + boff, mask=is_q[:, None], other=0).to(tl.int32) >> shift[None, :]) & 15
            if PREC == 8:
                lb = (tl.load(vl_ptr + boff, mask=is_q[:, None], other=0).to(tl.int32) >> shift[None, :]) & 15
                vc = 16 * ub + lb - 8
            else:
                vc = 16 * ub
            voff = qrow[:, None] * (D // Gv) + (d // Gv)[None, :]
            vs = tl.load(vsc_ptr + voff, mask=is_q[:, None], other=0.0).to(tl.float32) * 0.0625
            vm = tl.load(vmin_ptr + voff, mask=is_q[:, None], other=0.0).to(tl.float32)
            vq = vc.to(tl.float32) * vs + vm
            vb = tl.load(vbuf_ptr + buf_rows[:, None] * D + d[None, :], mask=is_b[:, None],
                         other=0.0).to(tl.float32)
            v = tl.where(is_q[:, None], vq, vb)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [RP, BT]
        if VERIFY:  # tokens in [nq_first, nq): codes for rows with t < nq_i, ring otherwise
            amb = is_q & is_b
            kb2 = tl.where(amb[:, None], kb, 0.0)
            vb2 = tl.where(amb[:, None], vb, 0.0)
            use_b = amb[None, :] & (t[None, :] >= nq_row[:, None])
            s = tl.where(use_b, tl.dot(q, tl.trans(kb2), input_precision="ieee"), s)
        ok = tmask[None, :] & (t[None, :] <= limit[:, None]) & rmask[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if VERIFY:
            pb = tl.where(use_b, p, 0.0)
            pv = tl.dot(p - pb, v, input_precision="ieee") + tl.dot(pb, vb2, input_precision="ieee")
        else:
            pv = tl.dot(p, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    part = bh * n_splits + split
    tl.store(o_ptr + (part * RP + r)[:, None] * D + d[None, :], out)
    tl.store(lse_ptr + part * RP + r, lse)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, Hq, Hkv, n_new, n_splits, D: tl.constexpr,
                  RP: tl.constexpr):
    """Log-sum-exp merge of the splits of one (sequence, kv head): [n_splits, RP, D]."""
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    groups = Hq // Hkv
    R = groups * n_new
    r = tl.arange(0, RP)
    d = tl.arange(0, D)
    top = tl.full([RP], float("-inf"), tl.float32)
    for sp in range(0, n_splits):
        top = tl.maximum(top, tl.load(lse_ptr + (bh * n_splits + sp) * RP + r))
    top = tl.where(top == float("-inf"), 0.0, top)  # padded rows: every weight is 0
    acc = tl.zeros([RP, D], tl.float32)
    wsum = tl.zeros([RP], tl.float32)
    for sp in range(0, n_splits):
        lse = tl.load(lse_ptr + (bh * n_splits + sp) * RP + r)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - top))
        part = tl.load(o_ptr + ((bh * n_splits + sp) * RP + r)[:, None] * D + d[None, :])
        acc += w[:, None] * part
        wsum += w
    out = acc / tl.where(wsum > 0, wsum, 1.0)[:, None]
    rows = (b * Hq + h * groups) * n_new + r  # out [B, Hq, n, D]: a kv head's rows in a run
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(r < R)[:, None])


def flash_decode_forward(q: Tensor, k_u: Optional[Tensor], k_l: Optional[Tensor],
                         k_min: Optional[Tensor], k_scale: Optional[Tensor],
                         v_u: Optional[Tensor], v_l: Optional[Tensor], v_min: Optional[Tensor],
                         v_scale: Optional[Tensor], k_buf: Tensor, v_buf: Tensor,
                         n_quant: Optional[Tensor], lengths: Tensor, precision: int,
                         group_size: int, scale: float, max_length: int = 0) -> Tensor:
    # max_length > 0: the splits cover it without reading lengths.max() from the device
    # (a captured decode step; empty splits have lse -inf and weigh 0 in the merge)
    b, hq, n, d = q.shape
    if d & (d - 1):
        raise ValueError(f"the Triton flash_decode needs a power-of-two head_dim, got {d}")
    hkv, ring = k_buf.shape[1], k_buf.shape[2]
    rp = max(16, triton.next_power_of_2((hq // hkv) * n))
    bt = 32
    max_len = max_length or int(lengths.max())
    if q.device.type == "cuda":
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        want = max(1, (2 * sms) // max(1, b * hkv))
    else:
        want = 4
    chunk = max(bt, triton.cdiv(triton.cdiv(max_len, want), bt) * bt)
    if precision != 16:
        chunk = triton.cdiv(chunk, group_size) * group_size if chunk > group_size else chunk
    splits = triton.cdiv(max_len, chunk)
    o_part = torch.empty((b * hkv * splits, rp, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b * hkv * splits, rp), dtype=torch.float32, device=q.device)
    dummy = k_buf
    if precision == 16:
        k_u = k_l = v_u = v_l = k_min = k_scale = v_min = v_scale = n_quant = dummy
        tq, g, gv = 0, 1, d
    else:
        tq, g, gv = v_u.shape[2], group_size, d // v_min.shape[-1]
    _flash_decode_kernel[(b * hkv, splits)](
        q.contiguous(), k_u, k_l, k_min, k_scale, v_u, v_l, v_min, v_scale, k_buf, v_buf,
        n_quant, lengths, o_part, lse, hq, hkv, n, tq, ring, g, gv, chunk, splits, scale,
        D=d, RP=rp, BT=bt, PREC=precision, VERIFY=precision != 16 and n > 1)
    out = torch.empty_like(q)
    _merge_kernel[(b * hkv,)](o_part, lse, out, hq, hkv, n, splits, D=d, RP=rp)
    return out
