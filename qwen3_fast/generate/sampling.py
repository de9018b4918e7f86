"""Token sampling for the engine: penalties, temperature, top-k, top-p, min-p, seeded draws.

Owns the per-step math on a batch of logits with per-row parameters (each request in a batch
keeps its own sampling settings and its own seeded ``torch.Generator``), and the running token
statistics the penalties need (:class:`PenaltyState`).

Order of operations (the order transformers applies its processors and warpers in):
1. repetition penalty (HF/CTRL semantics: over prompt AND generated tokens, a seen token's
   logit is divided by the penalty when positive, multiplied when negative);
2. presence / frequency penalties (OpenAI semantics, generated tokens only):
   ``logit -= presence * [count > 0] + frequency * count``;
3. temperature (0 means greedy: argmax of the penalized logits, nothing drawn);
4. top-k, then top-p (smallest set whose probability reaches p, at least one token), then
   min-p (drop tokens below ``min_p * max prob``); the survivors are renormalized.

Departure from a literal full-vocabulary implementation, for speed: the filters run on the
``k_max`` best candidates only (``torch.topk`` instead of sorting the 151936-entry vocabulary),
where ``k_max`` is the largest top-k of the batch; rows without top-k fall back to the whole
vocabulary. The result is the same distribution (top-p and min-p only ever keep a prefix of
the sorted candidates). Draws use the exponential-race trick (``argmax p / E`` with
``E ~ Exp(1)``), which needs no host synchronization and one generator call per row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class PenaltyState:
    """Token statistics of a batch for the penalties.

    counts [B, V] int32: how often each token was generated (presence/frequency);
    seen [B, V] bool: prompt or generated tokens (repetition penalty). Only allocated when a
    row of the batch uses the corresponding penalty.
    """

    def __init__(self, batch_size: int, vocab_size: int, device, need_counts: bool,
                 need_seen: bool):
        self.counts = (torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=device)
                       if need_counts else None)
        self.seen = (torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
                     if need_seen else None)

    def add_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if self.seen is None:
            return
        for b, ids in enumerate(prompts):
            if len(ids):
                self.seen[b, torch.as_tensor(list(ids), device=self.seen.device)] = True

    def add_tokens(self, tokens: Tensor, mask: Optional[Tensor] = None) -> None:
        """tokens [B] int64: one generated token per row; mask [B] bool: rows that take it
        (None: all; speculative steps give rows different numbers of tokens)."""
        idx = tokens.view(-1, 1)
        if self.counts is not None:
            inc = (torch.ones_like(idx, dtype=torch.int32) if mask is None
                   else mask.view(-1, 1).to(torch.int32))
            self.counts.scatter_add_(1, idx, inc)
        if self.seen is not None:
            if mask is None:
                self.seen.scatter_(1, idx, True)
            else:
                self.seen.scatter_(1, idx, self.seen.gather(1, idx) | mask.view(-1, 1))


def apply_penalties(logits: Tensor, state: Optional[PenaltyState], repetition: Tensor,
                    presence: Tensor, frequency: Tensor) -> Tensor:
    """logits [B, V] float32 -> penalized copy. repetition/presence/frequency: [B] float32."""
    if state is None:
        return logits
    if state.seen is not None:
        rep = repetition.view(-1, 1)
        scaled = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(state.seen, scaled, logits)
    if state.counts is not None:
        counts = state.counts.to(logits.dtype)
        logits = logits - presence.view(-1, 1) * (counts > 0).to(logits.dtype) \
            - frequency.view(-1, 1) * counts
    return logits


def filtered_candidates(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                        min_p: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """The sampling distribution of each row over its best candidates.

    Parameters
    ----------
    logits : [B, V] float32 (penalties applied)
    temperature : [B] float32, > 0 (greedy rows are handled by the caller)
    top_k : [B] int64, 0 = off;  top_p : [B] float32 in (0, 1];  min_p : [B] float32 in [0, 1)
    k_max : number of candidates to keep (>= every row's top_k; V when a row has top_k = 0)

    Returns
    -------
    probs [B, k_max] float32 (rows sum to 1, filtered entries 0), ids [B, k_max] int64.
    """
    b, v = logits.shape
    k_max = max(1, min(k_max, v))
    vals, ids = torch.topk(logits, k_max, dim=-1, sorted=True)  # [B, K] descending
    vals = vals / temperature.view(-1, 1)
    rank = torch.arange(k_max, device=logits.device).view(1, -1)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v)).view(-1, 1)
    vals = vals.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    # top-p: keep token i when the mass before it is < p (so the first token always stays)
    before = torch.cumsum(probs, dim=-1) - probs
    keep = before < top_p.view(-1, 1)
    # min-p relative to the most likely token (column 0), on the top-k/top-p survivors
    probs = probs * keep
    keep = keep & (probs >= min_p.view(-1, 1) * probs[:, :1])
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True), ids


def draw(probs: Tensor, generators: Sequence[Optional[torch.Generator]]) -> Tensor:
    """One index per row of probs [B, K] (argmax of p / Exp(1) noise), using each row's
    generator (None: torch's default generator). Returns [B] int64."""
    noise = torch.empty_like(probs)
    for b, g in enumerate(generators):
        noise[b].exponential_(generator=g)
    return torch.argmax(probs / noise, dim=-1)


class BatchSampler:
    """Per-row sampling settings of one batch as tensors, and :meth:`sample`.

    params: one :class:`~qwen3_fast.generate.params.SamplingParams` per row, already
    resolved (no None fields). prompts: the prompt ids per row (for the repetition penalty).
    """

    def __init__(self, params: Sequence, prompts: Sequence[Sequence[int]], vocab_size: int,
                 device):
        self.vocab_size, self.device = vocab_size, device
        f32 = dict(dtype=torch.float32, device=device)
        self.temperature = torch.tensor([p.temperature for p in params], **f32)
        self.greedy_rows = [p.temperature == 0 for p in params]
        self.all_greedy = all(self.greedy_rows)
        self.temperature = torch.where(self.temperature > 0, self.temperature,
                                       torch.ones_like(self.temperature))
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], **f32)
        self.min_p = torch.tensor([p.min_p for p in params], **f32)
        self.repetition = torch.tensor([p.repetition_penalty for p in params], **f32)
        self.presence = torch.tensor([p.presence_penalty for p in params], **f32)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], **f32)
        sampled = [p for p, g in zip(params, self.greedy_rows) if not g]
        self.k_max = vocab_size if any(p.top_k <= 0 for p in sampled) else \
            max((p.top_k for p in sampled), default=1)
        need_counts = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
        need_seen = any(p.repetition_penalty != 1 for p in params)
        self.state = (PenaltyState(len(params), vocab_size, device, need_counts, need_seen)
                      if need_counts or need_seen else None)
        if self.state is not None:
            self.state.add_prompts(prompts)
        self.generators: list[Optional[torch.Generator]] = []
        for p in params:
            if p.seed is None:
                self.generators.append(None)
            else:
                g = torch.Generator(device=device)
                g.manual_seed(int(p.seed))
                self.generators.append(g)

    def sample(self, logits: Tensor) -> Tensor:
        """logits [B, V] (any float dtype) -> next tokens [B] int64.

        Call :meth:`observe` with the tokens the sequences finally hold (the engine may
        replace some, e.g. with the thinking-budget sentence) before the next step."""
        logits = logits[:, : self.vocab_size].float()
        logits = apply_penalties(logits, self.state, self.repetition, self.presence,
                                 self.frequency)
        if self.all_greedy:
            return torch.argmax(logits, dim=-1)
        probs, ids = filtered_candidates(logits, self.temperature, self.top_k, self.top_p,
                                         self.min_p, self.k_max)
        tokens = ids.gather(1, draw(probs, self.generators).view(-1, 1)).view(-1)
        if any(self.greedy_rows):
            greedy = torch.tensor(self.greedy_rows, device=logits.device)
            tokens = torch.where(greedy, torch.argmax(logits, dim=-1), tokens)
        return tokens

    def observe(self, tokens: Tensor, mask: Optional[Tensor] = None) -> None:
        """tokens [B] int64: the tokens appended this step (updates the penalty statistics);
        mask [B] bool: only these rows appended one (None: all)."""
        if self.state is not None:
            self.state.add_tokens(tokens, mask)
