"""Fused LM head + cross-entropy: ``qwen3_fast.ops.linear_cross_entropy(hidden, weight, labels)``.

Equals ``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index, reduction)``
(HF's lm_head in the input dtype, then fp32 CE) without ever holding the [T, V] logits:
at V = 151936 those are 0.6 MB per token in fp32, more than the rest of a small model's
activations. Tokens are processed in chunks of ``chunk_size`` rows; per chunk the logits
[C, V] are computed, turned into the per-row loss and, in the same buffer, into the
gradient ``(softmax - onehot) * scale``, which is immediately multiplied into
``grad_hidden[chunk] = g @ W`` and ``grad_weight += g.T @ h`` (g rounded to the input
dtype, as autograd's cast back would; an fp32 accumulator for half-precision weights, so
chunking adds one rounding per chunk at most; that [V, H] fp32 buffer is the op's largest
allocation).

Why the gradients are computed in the forward: the loss is a scalar, so its backward only
multiplies the gradients by the scalar ``grad_output``. Computing them while the chunk's
logits are at hand costs one logits GEMM instead of two (a separate backward would have to
recompute them) and keeps peak memory at one chunk. The forward therefore saves
grad_hidden [T, H] and grad_weight [V, H] (nothing else) for the backward. When no input
needs a gradient (eval, no_grad) they are not computed.

Backends: ``chunked`` (torch ops per chunk; any device; the default everywhere: the work is
two GEMMs per chunk that torch's BLAS already runs at full speed, plus a row softmax, so a
C++ kernel would only replace the softmax) and ``triton`` (the per-chunk CE and its
gradient in one Triton kernel, ops/triton/linear_cross_entropy.py; used on GPU only when
forced with ``QWEN3_FAST_BACKEND=triton`` until it has passed on a real GPU; runs on the
CPU under TRITON_INTERPRET=1). ``QWEN3_FAST_BACKEND=reference`` runs the unfused oracle.
Under autocast, hidden and weight are cast to the autocast dtype first (what ``F.linear``
would do), so a model trained with bf16 autocast gets bf16 logits like HF.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference

REDUCTIONS = ("mean", "sum")
WGRAD_SLICE = 16384  # vocabulary rows per half-precision weight-gradient GEMM


def default_chunk_size(tokens: int, vocab: int) -> int:
    """Rows per chunk: a power of two whose fp32 logits stay near 2**26 elements (256 MB)."""
    rows = max(1, (1 << 26) // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(16, min(4096, rows))


# ------------------------------------------------------------------ one backend, 2-D
def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, labels: Tensor,
                                 ignore_index: int, reduction: str, chunk_size: int,
                                 backend: str, need_grad_hidden: bool,
                                 need_grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [T, H], weight [V, H] (same dtype), labels [T] int64 ->
    (loss: [] fp32 (fp64 for fp64 inputs), grad_hidden: [T, H] or [0],
    grad_weight: [V, H] in weight's dtype or [0]), the gradients of loss itself."""
    tokens, hid = hidden.shape
    vocab = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index  # [T]
    if reduction == "mean":
        # N = 0 gives 0/0 = NaN like F.cross_entropy; a tensor, so no host sync
        scale = 1.0 / valid.sum().to(acc).reshape(1)
    else:
        scale = torch.ones(1, dtype=acc, device=hidden.device)
    safe = torch.where(valid, labels, torch.zeros_like(labels))  # [T] in [0, V)
    need_grad = need_grad_hidden or need_grad_weight
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty((tokens, hid) if need_grad_hidden else (0,), dtype=hidden.dtype,
                         device=hidden.device)
    # fp32 accumulator for half weights: the chunk sums would otherwise round per chunk
    grad_w = torch.zeros((vocab, hid) if need_grad_weight else (0,), dtype=acc,
                         device=hidden.device)
    wt = weight.t()
    for start in range(0, tokens, chunk_size):
        end = min(tokens, start + chunk_size)
        h = hidden[start:end]  # [C, H]
        logits = (h @ wt).to(acc)  # [C, V]: the lm_head in the input dtype, then upcast
        if backend == "triton":
            from qwen3_fast.ops.triton.linear_cross_entropy import ce_rows_

            rows = ce_rows_(logits, labels[start:end], scale.to(torch.float32), ignore_index)
            total += rows.to(acc).sum()
        else:
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            v = valid[start:end]
            y = safe[start:end].unsqueeze(1)
            total += ((lse - logits.gather(1, y).squeeze(1)) * v).sum()
            if need_grad:
                logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                logits.scatter_add_(1, y, -v.to(acc).unsqueeze(1))
                logits.mul_((v * scale).unsqueeze(1))
        if not need_grad:
            continue
        g = logits.to(hidden.dtype)  # [C, V]: what autograd's cast back to the logits dtype does
        if need_grad_hidden:
            torch.mm(g, weight, out=grad_h[start:end])
        if need_grad_weight:
            if acc == hidden.dtype:  # fp32 / fp64: straight into the accumulator
                grad_w.addmm_(logits.t(), h)
            else:
                # half inputs: the GEMM in the input dtype (2-3x faster than fp32 where the
                # CPU/GPU has bf16 units), in vocabulary slices added to the fp32
                # accumulator, so the temporaries stay [slice, H] instead of [V, H]
                gt = g.t()  # [V, C]
                for v0 in range(0, vocab, WGRAD_SLICE):
                    grad_w[v0:v0 + WGRAD_SLICE] += (gt[v0:v0 + WGRAD_SLICE] @ h).to(acc)
    loss = total * scale.squeeze(0)
    return loss, grad_h, grad_w.to(weight.dtype)


# ------------------------------------------------------------------ custom op
@torch.library.custom_op("qwen3_fast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str,
             chunk_size: int, backend: str, need_grad_hidden: bool,
             need_grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    return linear_cross_entropy_forward(hidden.contiguous(), weight.contiguous(), labels,
                                        ignore_index, reduction, chunk_size, backend,
                                        need_grad_hidden, need_grad_weight)


@_lce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, chunk_size, backend, need_grad_hidden,
      need_grad_weight):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty((), dtype=acc),
            hidden.new_empty(hidden.shape if need_grad_hidden else (0,)),
            weight.new_empty(weight.shape if need_grad_weight else (0,)))


def _setup(ctx, inputs, output):
    _h, _w, _y, _ii, _red, _cs, _be, need_h, need_w = inputs
    # only the gradients are needed: the backward scales them by grad_output
    ctx.save_for_backward(output[1], output[2])
    ctx.need = (need_h, need_w)


def _backward(ctx, d_loss, _d_grad_h, _d_grad_w):
    grad_h, grad_w = ctx.saved_tensors
    need_h, need_w = ctx.need
    dh = (grad_h * d_loss.to(grad_h.dtype)) if need_h else None
    dw = (grad_w * d_loss.to(grad_w.dtype)) if need_w else None
    return dh, dw, None, None, None, None, None, None, None


torch.library.register_autograd("qwen3_fast::linear_cross_entropy_fwd", _backward,
                                setup_context=_setup)


# ------------------------------------------------------------------ public op


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without [T, V] logits.

    Parameters
    ----------
    hidden : Tensor, shape [..., H], float32/bfloat16/float16/float64
    weight : Tensor, shape [V, H], hidden's dtype (the LM head / tied embedding)
    labels : Tensor, shape [...] (hidden's leading shape), int64 or int32, each in [0, V)
        or ``ignore_index``; NOT shifted here (the caller aligns them with ``hidden``)
    ignore_index : int, labels with this value add nothing
    reduction : "mean" (over non-ignored labels; NaN when there are none, like torch) or "sum"
    chunk_size : rows per chunk, default :func:`default_chunk_size`

    Returns
    -------
    Tensor, shape [], float32 (float64 for float64 inputs), differentiable in hidden and weight.
    """
    _checks.check_tensor(hidden, "hidden")
    _checks.check_tensor(weight, "weight", ndim=2)
    _checks.check_same_device(hidden, "hidden", weight, "weight")
    if torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != torch.float64:
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
    _checks.check_same_dtype(hidden, "hidden", weight, "weight")
    hid = _checks.check_last_dim(hidden, "hidden", weight.shape[1])
    _checks.check_token_labels(labels, "labels", hidden, "hidden")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _checks.check_ignore_index(ignore_index)
    vocab = weight.shape[0]
    h2 = hidden.reshape(-1, hid)
    y = labels.reshape(-1).to(torch.int64)
    if chunk_size is None and vocab:
        chunk_size = default_chunk_size(h2.shape[0], vocab)
    _checks.check_chunk_size(chunk_size)
    _checks.check_label_values(y, "labels", vocab, ignore_index)
    backend = _backend.chunked_op_backend("linear_cross_entropy", hidden.device.type, hidden.dtype)
    if backend == "reference":
        return reference.linear_cross_entropy(h2, weight, y, ignore_index, reduction)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = _lce_fwd(h2, weight, y, int(ignore_index), reduction, int(chunk_size), backend,
                          grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return loss
