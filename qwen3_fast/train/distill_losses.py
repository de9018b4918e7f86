"""Losses of strong-to-weak distillation that are not ops: the teacher's top-k distribution
and the top-k KD term of off-policy distillation, both chunked over tokens so no [T, V]
logits tensor exists (one [C, V] chunk at a time).

Top-k KD (off-policy, ``topk_kd = k > 0``). For a response token t the teacher stores its k
most likely next tokens ``v_t1..v_tk`` with their log-probabilities ``l_tj`` (full-vocabulary
log-softmax at temperature 1). The stored distribution is renormalized over those k:

    q_tj = exp(l_tj) / sum_i exp(l_ti)

and the KD term is the cross-entropy of the student against it:

    KD_t = - sum_j q_tj * log p_S(v_tj | t),   log p_S = log_softmax(h_t @ W_S.T)

(= KL(q_t || p_S) + H(q_t); the entropy does not depend on the student). Its logit gradient
is ``softmax(z_t) - scatter(q_t)`` (sum_j q_tj = 1), so like ops.linear_cross_entropy the
gradients are formed while each chunk's logits are at hand and the backward only scales
them. The per-step loss of a KD run is ``(1 - kd_alpha) * CE + kd_alpha * KD`` averaged over
the response tokens (distill.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _chunk(tokens: int, vocab: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    rows = max(1, (1 << 26) // max(vocab, 1))  # fp32 chunk logits near 256 MB
    return max(16, min(4096, 1 << (rows.bit_length() - 1)))


@torch.no_grad()
def teacher_topk(hidden: Tensor, weight: Tensor, k: int, chunk_size: Optional[int] = None
                 ) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely next tokens per row.

    hidden [T, H], weight [V, H] -> (ids [T, k] int64, logprobs [T, k] fp32), each row's
    ids in descending probability; logprobs are the full-vocabulary log-softmax values."""
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, {weight.shape[0]}], got {k}")
    tokens = hidden.shape[0]
    ids = torch.empty(tokens, k, dtype=torch.long, device=hidden.device)
    lps = torch.empty(tokens, k, dtype=torch.float32, device=hidden.device)
    step = _chunk(tokens, weight.shape[0], chunk_size)
    h_all = hidden.to(weight.dtype)
    for s in range(0, tokens, step):
        logits = (h_all[s:s + step] @ weight.t()).float()  # [C, V]
        top, idx = logits.topk(k, dim=-1)
        lps[s:s + step] = top - torch.logsumexp(logits, dim=-1, keepdim=True)
        ids[s:s + step] = idx
    return ids, lps


class _TopkKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, logprobs, mask, chunk_size):
        tokens = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        q = torch.softmax(logprobs.float(), dim=-1)  # [T, k] renormalized teacher top-k
        m = mask.to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        for s in range(0, tokens, chunk_size):
            e = min(tokens, s + chunk_size)
            h = hidden[s:e]
            logits = (h @ weight.t()).float()  # [C, V]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            logp_sel = logits.gather(-1, ids[s:e]) - lse  # [C, k]
            total += -((q[s:e] * logp_sel).sum(-1) * m[s:e]).sum()
            if need_h or need_w:
                g = torch.exp(logits - lse, out=logits)  # softmax, in place of the logits
                g.scatter_add_(-1, ids[s:e], -q[s:e])
                g.mul_(m[s:e, None])
                if need_h:
                    grad_h[s:e] = (g.to(hidden.dtype) @ weight)
                if need_w:
                    grad_w += g.t() @ h.float()
        # The loss is a scalar: its backward only scales these, so the forward keeps the
        # finished gradients (grad_h [T, H], grad_w [V, H]) instead of any logits.
        ctx.save_for_backward(grad_h if need_h else torch.empty(0),
                              grad_w.to(weight.dtype) if need_w else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def topk_kd_loss(hidden: Tensor, weight: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                 mask: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Sum over masked rows of KD_t (module docstring), chunked; differentiable w.r.t.
    hidden and weight.

    hidden [T, H] (cast to weight's dtype), weight [V, H], topk_ids [T, k] int64,
    topk_logprobs [T, k] (the teacher's log-probs; renormalized here), mask [T] bool (rows
    that count) -> scalar fp32 (sum; divide by the token count for a mean)."""
    t = hidden.shape[0]
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != t or mask.shape != (t,):
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)}, topk_logprobs "
                         f"{tuple(topk_logprobs.shape)} and mask {tuple(mask.shape)} must be "
                         f"[T, k], [T, k], [T] with T = {t}")
    return _TopkKD.apply(hidden.to(weight.dtype), weight, topk_ids.long(), topk_logprobs,
                         mask.bool(), _chunk(t, weight.shape[0], chunk_size))


__all__ = ["teacher_topk", "topk_kd_loss"]
