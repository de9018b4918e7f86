"""Fused distillation loss: ``qwen3_fast.ops.linear_jsd(student_hidden, student_weight,
teacher_hidden, teacher_weight, labels, beta, temperature)``.

The generalized Jensen-Shannon divergence of GKD (REFERENCES.md) between the student's and
the teacher's next-token distributions, per token, without ever holding either model's
[T, V] logits: s = student_hidden @ student_weight.T and t = teacher_hidden @ teacher_weight.T
(each in its input dtype, like F.linear, then fp32), both divided by ``temperature``;
P_S = softmax(s), P_T = softmax(t), M = (1-beta) P_S + beta P_T and

    JSD_beta = beta KL(P_T || M) + (1-beta) KL(P_S || M).

The endpoints are computed as what they stand for, not through the mixture (which
degenerates to 0 there): beta = 0 is the forward KL(P_T || P_S), beta = 1 the reverse
KL(P_S || P_T). Gradients w.r.t. the (temperature-scaled) student logits, per row:

    beta = 0:  P_S - P_T
    beta = 1:  P_S * (log P_S - log P_T - KL(P_S||P_T))
    else:      (1-beta) P_S * (log P_S - log M - KL(P_S||M))

(the teacher terms' dependence on P_S cancels because sum M = 1). The teacher is a constant:
teacher_hidden / teacher_weight that require grad are DETACHED (ignored, not an error), as a
frozen teacher's parameters often still have requires_grad=True.

Tokens run in chunks of ``chunk_size`` rows; per chunk both logits [C, V] exist (fp32),
are turned into the per-row divergence and, in place, into the gradient w.r.t. the student
logits, which is multiplied straight into ``grad_hidden[chunk] = g @ W_s`` and
``grad_weight += g.T @ h_s`` (an fp32 accumulator for half-precision weights when there is
more than one chunk; on the CPU that GEMM runs in fp32 on the bf16-rounded g, on the GPU in
the input dtype in vocabulary slices, as in linear_cross_entropy). Peak memory growth of
forward + backward at V = 151936, bf16, Hs = 1024, Ht = 2048 (bench/bench_linear_jsd.py
--memory): 1078 MiB vs 2671 MiB unfused at T = 512, 1078 vs 10683 MiB at T = 2048 (ours
is flat in T: the [V, Hs] gradient buffers dominate; below ~T = 128 it is above unfused).

When the gradients are computed: for reduction "sum"/"mean" the loss is a scalar, so the
forward computes them while the chunk's logits are at hand (4 GEMMs per chunk instead of
6 for forward + recomputing backward) and the backward only scales them by grad_output;
the forward then saves grad_hidden and grad_weight, nothing else. For "none" the upstream
gradient is a per-token vector only known in the backward, and grad_weight = sum_t
g_out[t] * G_t^T h_t cannot be formed from per-token pieces without [T, V] storage, so the
forward computes only the losses and the backward recomputes both logits per chunk; it saves
the four inputs and the labels (references to tensors that exist anyway, no copies).

Backends: ``chunked`` (torch ops per chunk; the default everywhere, as for
linear_cross_entropy: the GEMMs dominate and already run in BLAS), ``triton`` (the per-chunk
divergence and its gradient in one Triton kernel, ops/triton/linear_jsd.py; used only when
forced with QWEN3_FAST_BACKEND=triton until it has passed on a real GPU; on the CPU under
TRITON_INTERPRET=1) and ``reference`` (the unfused oracle). Under autocast both pairs are
cast to the autocast dtype first (what F.linear would do).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops.linear_cross_entropy import WGRAD_SLICE, default_chunk_size

REDUCTIONS = ("none", "sum", "mean")
# The default chunk holds 2 * 2**26 / CHUNK_BUFFERS fp32 logits per model: 128 rows at
# V = 151936, 78 MB per [C, V] buffer, about 5 of them at the peak of the torch path
# (both logits, log M, P_T, a product). Measured on the CPU (bf16, T = 256, Hs = 1024,
# Ht = 2048): 64-row chunks ran 1.3x slower than the unfused path (the GEMMs lose
# efficiency at 64 rows), 128 rows as fast or faster.
CHUNK_BUFFERS = 2


def default_jsd_chunk_size(tokens: int, vocab: int) -> int:
    """Rows per chunk: a power of two in [16, 4096]; 128 rows at V = 151936."""
    return default_chunk_size(tokens, CHUNK_BUFFERS * vocab)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) for [C, V]. Deliberately not a bmm (which would save the [C, V]
    product): with TF32 or float32_matmul_precision("medium") a matmul would round the
    divergence sums to 10-bit mantissas."""
    return (a * b).sum(-1)


def divergence_rows_(s: Tensor, t: Tensor, beta: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """Per-row generalized JSD of one chunk, in torch; overwrites its inputs.

    Parameters
    ----------
    s, t : Tensor, shape [C, V], fp32/fp64: student and teacher logits already divided by
        the temperature (freshly allocated: both are used as scratch)
    beta : float in [0, 1]
    need_grad : whether to form the gradient

    Returns
    -------
    (rows [C], grad [C, V] or s): the divergence per row (no masking) and, if need_grad,
    its gradient w.r.t. s (one of the input buffers, reused).
    """
    s.sub_(torch.logsumexp(s, -1, keepdim=True))  # log P_S
    t.sub_(torch.logsumexp(t, -1, keepdim=True))  # log P_T
    if beta == 0.0:  # KL(P_T || P_S); d/ds = P_S - P_T
        pt = t.exp()
        rows = t.sub_(s).mul_(pt).sum(-1)  # sum P_T (log P_T - log P_S)
        if need_grad:
            s.exp_().sub_(pt)
        return rows, s
    if beta == 1.0:  # KL(P_S || P_T); d/ds = P_S (log P_S - log P_T - KL)
        ps = s.exp()
        t.sub_(s).neg_()  # log P_S - log P_T
        rows = _rowdot(ps, t)
        if need_grad:
            t.sub_(rows.unsqueeze(1)).mul_(ps)
        return rows, t
    # log M = logaddexp(log(1-beta) + log P_S, log(beta) + log P_T): finite even where
    # both probabilities underflow, so P * (log P - log M) never meets 0 * inf
    log_m = s + math.log1p(-beta)
    torch.logaddexp(log_m, t + math.log(beta), out=log_m)
    pt = t.exp()
    kl_t = pt.mul_(t.sub_(log_m)).sum(-1)  # KL(P_T || M) = sum P_T (log P_T - log M)
    del pt
    ps = s.exp()
    kl_s = _rowdot(ps, s.sub_(log_m))  # KL(P_S || M)
    del log_m
    rows = beta * kl_t + (1.0 - beta) * kl_s
    if need_grad:
        s.sub_(kl_s.unsqueeze(1)).mul_(ps).mul_(1.0 - beta)
    return rows, s


def jsd_chunks(sh: Tensor, sw: Tensor, th: Tensor, tw: Tensor, *args) -> tuple[Tensor, ...]:
    """:func:`_jsd_chunks` with autocast off: the caller cast the inputs already, and
    autocast must not turn the fp32 softmax math (row sums, logaddexp) into bf16."""
    with torch.autocast(sh.device.type, enabled=False):
        return _jsd_chunks(sh, sw, th, tw, *args)


def _jsd_chunks(sh: Tensor, sw: Tensor, th: Tensor, tw: Tensor, valid: Tensor,
                row_scale: Optional[Tensor], beta: float, temperature: float, chunk_size: int,
                backend: str, need_grad_hidden: bool,
                need_grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk loop shared by the forward and the "none" backward (2-D, contiguous).

    sh [T, Hs], sw [V, Hs] (same dtype), th [T, Ht], tw [V, Ht] (same dtype), valid [T] bool,
    row_scale [T] acc dtype (the gradient multiplier per row; 0 where masked) or None ->
    (rows [T] acc: divergence per row, 0 where masked; grad_hidden [T, Hs] or [0];
    grad_weight [V, Hs] in sw's dtype or [0]): the gradients of sum_t row_scale[t] rows[t].
    """
    tokens, hid = sh.shape
    vocab = sw.shape[0]
    acc = torch.float64 if sh.dtype == torch.float64 else torch.float32
    need_grad = row_scale is not None and (need_grad_hidden or need_grad_weight)
    rows_out = torch.empty((tokens,), dtype=acc, device=sh.device)
    grad_h = torch.empty((tokens, hid) if need_grad and need_grad_hidden else (0,),
                         dtype=sh.dtype, device=sh.device)
    # fp32 accumulator for half weights over several chunks: the chunk sums would otherwise
    # round per chunk. A single chunk writes its GEMM straight into the weight's dtype (one
    # rounding, as autograd; no [V, H] fp32 buffer). The first chunk assigns instead of
    # adding, so the buffer is never zero-filled.
    single = tokens <= chunk_size
    w_dtype = sw.dtype if single else acc
    grad_w = torch.empty((vocab, hid) if need_grad and need_grad_weight else (0,),
                         dtype=w_dtype, device=sh.device)
    swt, twt = sw.t(), tw.t()
    zero = torch.zeros((), dtype=acc, device=sh.device)
    for start in range(0, tokens, chunk_size):
        end = min(tokens, start + chunk_size)
        h = sh[start:end]  # [C, Hs]
        v = valid[start:end]
        s = (h @ swt).to(acc)  # [C, V]: each lm_head in its input dtype, then upcast
        t = (th[start:end] @ twt).to(acc)
        if backend == "triton":
            from qwen3_fast.ops.triton.linear_jsd import jsd_rows_

            scale = (row_scale[start:end] if need_grad else
                     torch.zeros((end - start,), dtype=acc, device=sh.device))
            rows = jsd_rows_(s, t, v, scale.to(torch.float32), beta, temperature, need_grad)
            g = s  # the kernel wrote d(row_scale * rows)/d(raw logits) over s
        else:
            if temperature != 1.0:
                s.div_(temperature)
                t.div_(temperature)
            rows, g = divergence_rows_(s, t, beta, need_grad)
            del t
            if need_grad:
                # d/d(raw logits) = d/ds / temperature, times the row's multiplier
                g.mul_((row_scale[start:end] / temperature).unsqueeze(1))
        rows_out[start:end] = torch.where(v, rows.to(acc), zero)
        if not need_grad:
            continue
        gd = g.to(sh.dtype)  # [C, V]: what autograd's cast back to the logits dtype does
        if need_grad_hidden:
            torch.mm(gd, sw, out=grad_h[start:end])
        if need_grad_weight:
            first = start == 0
            if single or acc == sh.dtype or sh.device.type == "cpu":
                # into the output or the fp32 (fp64) accumulator. Half inputs on the CPU: an
                # fp32 GEMM of the rounded g straight into the accumulator measured 2.5x
                # faster than bf16 slices + upcast (avx512_bf16 machine, [64, V] x [64, 1024])
                if not single and acc != sh.dtype:
                    g, h = gd.to(acc), h.to(acc)
                if first:
                    torch.mm(gd.t() if single else g.t(), h, out=grad_w)
                else:
                    grad_w.addmm_(g.t(), h)
            else:  # half on GPU: GEMMs in the input dtype, in vocabulary slices (see the CE op)
                gt = gd.t()  # [V, C]
                for v0 in range(0, vocab, WGRAD_SLICE):
                    part = gt[v0:v0 + WGRAD_SLICE] @ h
                    if first:
                        grad_w[v0:v0 + WGRAD_SLICE].copy_(part)
                    else:
                        grad_w[v0:v0 + WGRAD_SLICE] += part.to(acc)
    return rows_out, grad_h, grad_w.to(sw.dtype)


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("qwen3_fast::linear_jsd_fwd", mutates_args=())
def _jsd_fwd(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
             teacher_weight: Tensor, labels: Tensor, beta: float, temperature: float,
             ignore_index: int, reduction: str, chunk_size: int, backend: str,
             need_grad_hidden: bool, need_grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss: [T] for "none" else [], grad_hidden, grad_weight); the gradients (of the
    scalar loss) only for "sum"/"mean", else empty [0] (the backward recomputes them)."""
    sh, sw = student_hidden.contiguous(), student_weight.contiguous()
    th, tw = teacher_hidden.contiguous(), teacher_weight.contiguous()
    acc = torch.float64 if sh.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    if reduction == "none":
        rows, gh, gw = jsd_chunks(sh, sw, th, tw, valid, None, beta, temperature, chunk_size,
                                  backend, False, False)
        return rows, gh, gw
    if reduction == "mean":  # N = 0 gives 0/0 = NaN like F.cross_entropy; no host sync
        scale = 1.0 / valid.sum().to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=sh.device)
    row_scale = torch.where(valid, scale, torch.zeros((), dtype=acc, device=sh.device))
    need = need_grad_hidden or need_grad_weight
    rows, gh, gw = jsd_chunks(sh, sw, th, tw, valid, row_scale if need else None, beta,
                              temperature, chunk_size, backend, need_grad_hidden,
                              need_grad_weight)
    return rows.sum() * scale, gh, gw


@_jsd_fwd.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta,
      temperature, ignore_index, reduction, chunk_size, backend, need_grad_hidden,
      need_grad_weight):
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    pre = reduction != "none"
    return (student_hidden.new_empty((student_hidden.shape[0],) if not pre else (), dtype=acc),
            student_hidden.new_empty(student_hidden.shape if pre and need_grad_hidden else (0,)),
            student_weight.new_empty(student_weight.shape if pre and need_grad_weight else (0,)))


@torch.library.custom_op("qwen3_fast::linear_jsd_bwd", mutates_args=())
def _jsd_bwd(grad_rows: Tensor, student_hidden: Tensor, student_weight: Tensor,
             teacher_hidden: Tensor, teacher_weight: Tensor, labels: Tensor, beta: float,
             temperature: float, ignore_index: int, chunk_size: int, backend: str,
             need_grad_hidden: bool, need_grad_weight: bool) -> tuple[Tensor, Tensor]:
    """The "none" backward: recompute per chunk with the per-token upstream gradient."""
    sh, sw = student_hidden.contiguous(), student_weight.contiguous()
    th, tw = teacher_hidden.contiguous(), teacher_weight.contiguous()
    acc = torch.float64 if sh.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    row_scale = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc,
                                                                  device=sh.device))
    _, gh, gw = jsd_chunks(sh, sw, th, tw, valid, row_scale, beta, temperature, chunk_size,
                           backend, need_grad_hidden, need_grad_weight)
    return gh, gw


@_jsd_bwd.register_fake
def _(grad_rows, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta,
      temperature, ignore_index, chunk_size, backend, need_grad_hidden, need_grad_weight):
    return (student_hidden.new_empty(student_hidden.shape if need_grad_hidden else (0,)),
            student_weight.new_empty(student_weight.shape if need_grad_weight else (0,)))


def _setup(ctx, inputs, output):
    sh, sw, th, tw, labels, beta, temp, ii, reduction, cs, be, need_h, need_w = inputs
    ctx.need = (need_h, need_w)
    ctx.none = reduction == "none"
    # the gradient outputs get no upstream gradient; without this autograd would fill a
    # zero [V, Hs] tensor for them in every backward (measured: +1 weight-sized buffer)
    ctx.set_materialize_grads(False)
    if ctx.none:
        # per-token upstream gradient: the backward recomputes, from the inputs themselves
        ctx.save_for_backward(sh, sw, th, tw, labels)
        ctx.args = (beta, temp, ii, cs, be)
    else:
        # the scalar loss's gradients were formed in the forward; only they are needed
        ctx.save_for_backward(output[1], output[2])


def _backward(ctx, d_loss, _d_grad_h, _d_grad_w):
    need_h, need_w = ctx.need
    if d_loss is None:  # only the (non-differentiable) gradient outputs were used
        return (None,) * 13
    if ctx.none:
        sh, sw, th, tw, labels = ctx.saved_tensors
        beta, temp, ii, cs, be = ctx.args
        gh, gw = _jsd_bwd(d_loss, sh, sw, th, tw, labels, beta, temp, ii, cs, be, need_h,
                          need_w)
        dh, dw = (gh if need_h else None), (gw if need_w else None)
    else:
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * d_loss.to(grad_h.dtype)) if need_h else None
        dw = (grad_w * d_loss.to(grad_w.dtype)) if need_w else None
    return dh, dw, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("qwen3_fast::linear_jsd_fwd", _backward, setup_context=_setup)


# ------------------------------------------------------------------ public op


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def linear_jsd(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
               teacher_weight: Tensor, labels: Tensor, beta: float = 0.5,
               temperature: float = 1.0, ignore_index: int = -100,
               chunk_size: Optional[int] = None, reduction: str = "mean") -> Tensor:
    """Generalized JSD between student and teacher next-token distributions, fused.

    Parameters
    ----------
    student_hidden : Tensor, shape [..., Hs], float32/bfloat16/float16/float64
    student_weight : Tensor, shape [V, Hs], student_hidden's dtype (the student's LM head)
    teacher_hidden : Tensor, shape [..., Ht] (student_hidden's leading shape), float
    teacher_weight : Tensor, shape [V, Ht], teacher_hidden's dtype; the SAME vocabulary V
    labels : Tensor, shape [...] (the leading shape), int64/int32; only masks: tokens whose
        label == ignore_index count nothing (no loss, no gradient)
    beta : float in [0, 1]: 0 = forward KL(P_T||P_S), 1 = reverse KL(P_S||P_T), between =
        generalized JSD with M = (1-beta) P_S + beta P_T
    temperature : float > 0, applied to both models' logits
    ignore_index : int
    chunk_size : rows per chunk, default :func:`default_jsd_chunk_size`
    reduction : "none" ([...] fp32, 0 on masked rows), "sum" or "mean" (over unmasked
        tokens; NaN when there are none, like F.cross_entropy)

    Returns
    -------
    Tensor, fp32 (fp64 for an fp64 student), differentiable in student_hidden and
    student_weight only; teacher inputs are detached (treated as constants).
    """
    _checks.check_tensor(student_hidden, "student_hidden")
    _checks.check_tensor(student_weight, "student_weight", ndim=2)
    _checks.check_tensor(teacher_hidden, "teacher_hidden")
    _checks.check_tensor(teacher_weight, "teacher_weight", ndim=2)
    for t, name in ((student_weight, "student_weight"), (teacher_hidden, "teacher_hidden"),
                    (teacher_weight, "teacher_weight")):
        _checks.check_same_device(student_hidden, "student_hidden", t, name)
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    dev = student_hidden.device.type
    if torch.is_autocast_enabled(dev) and student_hidden.dtype != torch.float64:
        dt = torch.get_autocast_dtype(dev)
        student_hidden, student_weight = student_hidden.to(dt), student_weight.to(dt)
        teacher_hidden, teacher_weight = teacher_hidden.to(dt), teacher_weight.to(dt)
    _checks.check_same_dtype(student_hidden, "student_hidden", student_weight, "student_weight")
    _checks.check_same_dtype(teacher_hidden, "teacher_hidden", teacher_weight, "teacher_weight")
    hs = _checks.check_last_dim(student_hidden, "student_hidden", student_weight.shape[1])
    ht = _checks.check_last_dim(teacher_hidden, "teacher_hidden", teacher_weight.shape[1])
    vocab = student_weight.shape[0]
    if vocab == 0:
        raise ValueError("student_weight has 0 rows; expected a vocabulary of at least 1")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} rows (vocabulary size); "
                         f"expected student_weight's {vocab}: teacher and student must share "
                         "a vocabulary (tokenizer)")
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}; expected "
                         f"student_hidden's leading shape {lead} (one teacher row per token)")
    _checks.check_token_labels(labels, "labels", student_hidden, "student_hidden")
    beta = _check_number(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    temperature = _check_number(temperature, "temperature")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _checks.check_ignore_index(ignore_index)
    sh2, th2 = student_hidden.reshape(-1, hs), teacher_hidden.reshape(-1, ht)
    y = labels.reshape(-1).to(torch.int64)
    if chunk_size is None:
        chunk_size = default_jsd_chunk_size(sh2.shape[0], vocab)
    _checks.check_chunk_size(chunk_size)
    backend = _backend.chunked_op_backend("linear_jsd", student_hidden.device.type, student_hidden.dtype)
    if backend == "triton" and torch.float64 in (student_hidden.dtype, teacher_hidden.dtype):
        backend = "chunked"  # the Triton kernel is fp32; float64 is for gradcheck
    if backend == "reference":
        out = reference.linear_jsd(sh2, student_weight, th2, teacher_weight, y, beta,
                                   temperature, ignore_index, reduction)
    else:
        grad_on = torch.is_grad_enabled()
        out, _, _ = _jsd_fwd(sh2, student_weight, th2, teacher_weight, y, beta, temperature,
                             int(ignore_index), reduction, int(chunk_size), backend,
                             grad_on and student_hidden.requires_grad,
                             grad_on and student_weight.requires_grad)
    return out.reshape(lead) if reduction == "none" else out
