"""Fused LM head + log-softmax: ``qwen3_fast.ops.linear_logprobs(hidden, weight, targets)``.

Returns, per token t, ``logprobs[t] = log_softmax(hidden[t] @ weight.T / temperature)[targets[t]]``
and ``entropy[t]``, the entropy of that softmax (both fp32; fp64 for fp64 inputs), as the
unfused ``(hidden @ weight.T).float() / temperature`` -> log_softmax -> gather would, but
without ever holding the [T, V] logits (0.6 MB per token in fp32 at V = 151936). Rows whose
target is ``ignore_index`` give 0 in both outputs and no gradient. RL losses (GRPO's
ratio, the entropy bonus) use both outputs with arbitrary per-token upstream gradients.

Why the backward recomputes the logits (unlike linear_cross_entropy, which computes its
gradients in the forward): the outputs are per-token vectors, so the upstream gradients
``gl = d loss / d logprobs`` and ``ge = d loss / d entropy`` are only known in the backward,
and the gradient of the scaled logits ``s = z / temperature`` of a row,
``gl * (onehot(target) - p) - ge * p * (log p + H)``, depends on them per vocabulary entry.
Storing ``p`` would be the [T, V] tensor this op exists to avoid. So the forward saves only
hidden and weight (the op's inputs, alive anyway), targets, the per-row log-sum-exp [T] and
the entropy [T]: with them ``log p = s - lse`` and the gradient of every logit is local
(no reduction over the vocabulary in the backward), so the backward recomputes the logits
in [token block, vocabulary slice] tiles (:func:`backward_tiles`) with one GEMM each, plus
the two gradient GEMMs, as an unfused autograd does without the [T, V] buffers.

Memory: the forward holds per chunk of ``chunk_size`` rows the logits in the input dtype
and two [C, V] fp32 buffers (log p and p); the backward's tiles have the same element
count. Tiling the vocabulary in the backward (outer loop) means grad_weight's rows are
finished slice by slice: when the tokens fit one block (<= TOKEN_BLOCK) each slice comes
from one GEMM in the weight's dtype, rounded once like the unfused autograd, and no
[V, H] fp32 accumulator exists (with more tokens, a [slice, H] fp32 one sums the blocks).
grad_hidden sums one partial per slice in an fp32 [T, H] accumulator for half inputs.

Backends: ``chunked`` (torch ops per chunk; the default on every device: the heavy work is
GEMMs that torch's BLAS already runs at full speed) and ``triton`` (the per-chunk
softmax / log-prob / entropy and their gradient in Triton kernels,
ops/triton/linear_logprobs.py; on GPU only when forced with ``QWEN3_FAST_BACKEND=triton``
until it has passed on a real GPU; on the CPU under TRITON_INTERPRET=1).
``QWEN3_FAST_BACKEND=reference`` runs the unfused oracle. Under autocast, hidden and weight
are cast to the autocast dtype first (what ``F.linear`` would do).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops.linear_cross_entropy import default_chunk_size

TOKEN_BLOCK = 4096  # most token rows of one backward tile (see backward_tiles)

__all__ = ["linear_logprobs", "default_chunk_size"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h: Tensor, wt: Tensor, acc: torch.dtype, temperature: float) -> Tensor:
    """[C, V] in `acc`: the lm_head in the input dtype, upcast, then / temperature."""
    z = (h @ wt).to(acc)  # a fresh buffer either way, so the in-place ops below are safe
    if temperature != 1.0:
        z.div_(temperature)
    return z


# ------------------------------------------------------------------ forward, 2-D
def linear_logprobs_forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                            ignore_index: int, chunk_size: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [T, H], weight [V, H] (same dtype), targets [T] int64 ->
    (logprobs [T], entropy [T], lse [T]) in fp32 (fp64 for fp64 inputs); lse is the per-row
    log-sum-exp of the scaled logits, saved for the backward."""
    tokens = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    valid = targets != ignore_index  # [T]
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # [T] in [0, V)
    logprobs = torch.empty(tokens, dtype=acc, device=hidden.device)
    entropy = torch.empty(tokens, dtype=acc, device=hidden.device)
    lse = torch.empty(tokens, dtype=acc, device=hidden.device)
    wt = weight.t()
    for start in range(0, tokens, chunk_size):
        end = min(tokens, start + chunk_size)
        if backend == "triton":
            from qwen3_fast.ops.triton.linear_logprobs import logprob_rows

            z = (hidden[start:end] @ wt).to(acc)  # the kernel divides by the temperature
            lp, ent, m = logprob_rows(z, targets[start:end], temperature, ignore_index)
            logprobs[start:end], entropy[start:end], lse[start:end] = lp, ent, m
            continue
        s = _chunk_logits(hidden[start:end], wt, acc, temperature)  # [C, V]
        m = torch.logsumexp(s, dim=-1)  # [C]
        lse[start:end] = m
        v = valid[start:end]
        lp = s.gather(1, safe[start:end].unsqueeze(1)).squeeze(1) - m
        s.sub_(m.unsqueeze(1))  # log p, in place
        p = s.exp()  # [C, V]: the second buffer
        ent = -p.mul_(s).sum(-1)
        zero = torch.zeros((), dtype=acc, device=hidden.device)
        logprobs[start:end] = torch.where(v, lp, zero)
        entropy[start:end] = torch.where(v, ent, zero)
    return logprobs, entropy, lse


# ------------------------------------------------------------------ backward, 2-D
def backward_tiles(tokens: int, vocab: int, chunk_size: int) -> tuple[int, int]:
    """(token rows, vocabulary columns) of one backward tile.

    The backward needs no full row: with the saved lse and H, each logit's gradient is
    local, so it tiles the vocabulary too. The tile keeps the forward chunk's element
    budget (chunk_size * V) but is shaped [up to TOKEN_BLOCK rows, the rest columns], so
    that grad_weight, the outer loop's slice, is summed over few token blocks (often one:
    then it is written straight from one GEMM, rounded once like the unfused autograd, and
    no [V, H] fp32 accumulator exists).
    """
    rows = max(1, min(tokens, TOKEN_BLOCK))
    cols = max(1, min(vocab, (chunk_size * vocab) // rows))
    return rows, cols


def linear_logprobs_backward(grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor,
                             weight: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
                             temperature: float, ignore_index: int, chunk_size: int,
                             backend: str, need_grad_hidden: bool,
                             need_grad_weight: bool) -> tuple[Tensor, Tensor]:
    """Upstream gradients [T] of both outputs -> (grad_hidden [T, H] or [0],
    grad_weight [V, H] in weight's dtype or [0]), recomputing the logits tile by tile:
    outer loop over vocabulary slices [v0, v1), inner over token blocks [t0, t1)."""
    tokens, hid = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=acc, device=dev)
    gl_all = torch.where(valid, grad_logprobs.to(acc), zero)  # ignored rows: no gradient
    ge_all = torch.where(valid, grad_entropy.to(acc), zero)
    # the target's column, or -1 (no one-hot entry) on ignored rows
    tcol = torch.where(valid, targets, torch.full_like(targets, -1))
    rows, cols = backward_tiles(tokens, vocab, chunk_size)
    # grad_hidden sums one partial per vocabulary slice: fp32 accumulator for half inputs
    # (a single slice writes it directly)
    one_slice = cols >= vocab
    gh_acc = None
    if need_grad_hidden and not one_slice and acc != hidden.dtype:
        gh_acc = torch.zeros((tokens, hid), dtype=acc, device=dev)
    grad_h = torch.zeros((tokens, hid) if need_grad_hidden else (0,), dtype=hidden.dtype,
                         device=dev)
    grad_w = torch.zeros((vocab, hid) if need_grad_weight else (0,), dtype=weight.dtype,
                         device=dev)
    if not (need_grad_hidden or need_grad_weight) or tokens == 0:
        return grad_h, grad_w
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        w_s = weight[v0:v1]  # [Vs, H]
        # grad_weight[v0:v1] over several token blocks: summed in fp32 (one block: direct)
        w_acc = None
        if need_grad_weight and tokens > rows and acc != weight.dtype:
            w_acc = torch.zeros((v1 - v0, hid), dtype=acc, device=dev)
        for t0 in range(0, tokens, rows):
            t1 = min(tokens, t0 + rows)
            h = hidden[t0:t1]  # [C, H]
            gl, ge = gl_all[t0:t1], ge_all[t0:t1]
            g = (h @ w_s.t()).to(acc)  # [C, Vs]: the lm_head tile, then upcast
            if backend == "triton":
                from qwen3_fast.ops.triton.linear_logprobs import logprob_grad_rows_

                logprob_grad_rows_(g, tcol[t0:t1], v0, lse[t0:t1], entropy[t0:t1], gl, ge,
                                   temperature)
            else:
                if temperature != 1.0:
                    g.div_(temperature)  # s = z / temperature
                g.sub_(lse[t0:t1].unsqueeze(1))  # log p
                p = g.exp()
                # d/ds of ge * H = -ge * p * (log p + H); of gl * log p[y] = gl * (onehot - p)
                g.add_(entropy[t0:t1].unsqueeze(1)).mul_(p).mul_(-ge.unsqueeze(1))
                g.sub_(p.mul_(gl.unsqueeze(1)))
                y = tcol[t0:t1]
                hit = (y >= v0) & (y < v1)
                g.index_put_((torch.arange(t1 - t0, device=dev), (y - v0).clamp(0, v1 - v0 - 1)),
                             gl * hit, accumulate=True)
                if temperature != 1.0:
                    g.div_(temperature)  # chain rule through s = z / temperature
            gd = g.to(hidden.dtype)  # [C, Vs]: what autograd's cast back to the logits dtype does
            if need_grad_hidden:
                part = gd @ w_s  # [C, H]
                if one_slice:
                    grad_h[t0:t1] = part
                elif gh_acc is not None:
                    gh_acc[t0:t1] += part.to(acc)
                else:
                    grad_h[t0:t1] += part
            if need_grad_weight:
                if w_acc is not None:
                    w_acc += (gd.t() @ h).to(acc)
                elif tokens > rows:  # fp32 / fp64 weights: accumulate in place
                    grad_w[v0:v1].addmm_(g.t(), h)
                else:
                    torch.mm(gd.t(), h, out=grad_w[v0:v1])
        if w_acc is not None:
            grad_w[v0:v1] = w_acc
    if gh_acc is not None:
        grad_h.copy_(gh_acc)
    return grad_h, grad_w


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("qwen3_fast::linear_logprobs_fwd", mutates_args=())
def _llp_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
             ignore_index: int, chunk_size: int,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return linear_logprobs_forward(hidden.contiguous(), weight.contiguous(), targets,
                                   temperature, ignore_index, chunk_size, backend)


@_llp_fwd.register_fake
def _(hidden, weight, targets, temperature, ignore_index, chunk_size, backend):
    acc = _acc_dtype(hidden.dtype)
    rows = (hidden.shape[0],)
    return (hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows, dtype=acc),
            hidden.new_empty(rows, dtype=acc))


@torch.library.custom_op("qwen3_fast::linear_logprobs_bwd", mutates_args=())
def _llp_bwd(grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor,
             targets: Tensor, lse: Tensor, entropy: Tensor, temperature: float,
             ignore_index: int, chunk_size: int, backend: str, need_grad_hidden: bool,
             need_grad_weight: bool) -> tuple[Tensor, Tensor]:
    return linear_logprobs_backward(grad_logprobs, grad_entropy, hidden.contiguous(),
                                    weight.contiguous(), targets, lse, entropy, temperature,
                                    ignore_index, chunk_size, backend, need_grad_hidden,
                                    need_grad_weight)


@_llp_bwd.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, targets, lse, entropy, temperature,
      ignore_index, chunk_size, backend, need_grad_hidden, need_grad_weight):
    return (hidden.new_empty(hidden.shape if need_grad_hidden else (0,)),
            weight.new_empty(weight.shape if need_grad_weight else (0,)))


def _setup(ctx, inputs, output):
    hidden, weight, targets, temperature, ignore_index, chunk_size, backend = inputs
    _lp, entropy, lse = output
    # hidden/weight: to recompute each chunk's logits (they are the op's inputs, so saving
    # them costs no memory); lse [T] and entropy [T]: log p = s - lse and the entropy term
    # of the gradient without a reduction over the vocabulary; never anything [T, V].
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.args = (temperature, ignore_index, chunk_size, backend)


def _backward(ctx, d_logprobs, d_entropy, _d_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None, None, None, None, None, None
    if d_logprobs is None:
        d_logprobs = torch.zeros_like(lse)
    if d_entropy is None:
        d_entropy = torch.zeros_like(lse)
    temperature, ignore_index, chunk_size, backend = ctx.args
    dh, dw = _llp_bwd(d_logprobs, d_entropy, hidden, weight, targets, lse, entropy,
                      temperature, ignore_index, chunk_size, backend, need_h, need_w)
    return (dh if need_h else None), (dw if need_w else None), None, None, None, None, None


torch.library.register_autograd("qwen3_fast::linear_logprobs_fwd", _backward,
                                setup_context=_setup)


# ------------------------------------------------------------------ public op


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                    ignore_index: int = -100,
                    chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Target log-probabilities and entropies of ``softmax(hidden @ weight.T / temperature)``
    without [T, V] logits.

    Parameters
    ----------
    hidden : Tensor, shape [T, H] (or [..., H]), float32/bfloat16/float16/float64
    weight : Tensor, shape [V, H], hidden's dtype (the LM head / tied embedding)
    targets : Tensor, shape [T] (hidden's leading shape), int64 or int32, each in [0, V) or
        ``ignore_index``; NOT shifted here (the caller aligns them with ``hidden``)
    temperature : float > 0, divides the logits (after the fp32 upcast)
    ignore_index : int, targets with this value give 0 in both outputs and no gradient
    chunk_size : rows per chunk, default :func:`default_chunk_size` (as linear_cross_entropy)

    Returns
    -------
    (logprobs, entropy) : Tensors of targets' shape, float32 (float64 for float64 inputs),
    both differentiable in hidden and weight.
    """
    _checks.check_tensor(hidden, "hidden")
    _checks.check_tensor(weight, "weight", ndim=2)
    _checks.check_same_device(hidden, "hidden", weight, "weight")
    if torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != torch.float64:
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
    _checks.check_same_dtype(hidden, "hidden", weight, "weight")
    hid = _checks.check_last_dim(hidden, "hidden", weight.shape[1])
    _checks.check_token_labels(targets, "targets", hidden, "hidden")
    temperature = _check_temperature(temperature)
    _checks.check_ignore_index(ignore_index)
    vocab = weight.shape[0]
    h2 = hidden.reshape(-1, hid)
    y = targets.reshape(-1).to(torch.int64)
    if chunk_size is None and vocab:
        chunk_size = default_chunk_size(h2.shape[0], vocab)
    _checks.check_chunk_size(chunk_size)
    _checks.check_label_values(y, "targets", vocab, ignore_index)
    backend = _backend.chunked_op_backend("linear_logprobs", hidden.device.type, hidden.dtype)
    if backend == "reference":
        lp, ent = reference.linear_logprobs(h2, weight, y, temperature, ignore_index)
    else:
        lp, ent, _ = _llp_fwd(h2, weight, y, temperature, int(ignore_index), int(chunk_size),
                              backend)
    return lp.reshape(targets.shape), ent.reshape(targets.shape)
