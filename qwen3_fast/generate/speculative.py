"""Self-speculative decoding (QuantSpec): configuration, acceptance rules, gamma control.

The draft is the same model reading the 4-bit view of the hierarchical KV cache (and,
optionally, 4-bit weights); the target is the model reading the 8-bit view. One step:
the draft proposes ``gamma`` tokens one at a time, the target scores all ``gamma + 1``
positions in one verify pass (``flash_decode`` with n > 1 queries), this module decides how
many draft tokens each sequence keeps and which token follows them, and the cache rolls the
rejected ones back.

Acceptance keeps the output distribution exactly the target's:

- greedy (temperature 0): keep the longest prefix where the draft token equals the target's
  argmax, then emit the target's token at the first mismatch (or its bonus token after
  ``gamma`` matches). The output equals plain greedy decoding with the target.
- sampling: for each draft token x_i ~ q_i, accept with probability min(1, p_i(x_i) /
  q_i(x_i)); at the first rejection draw from norm(max(p_i - q_i, 0)); after ``gamma``
  acceptances draw the bonus token from p_gamma. This is the rejection scheme of
  Leviathan et al. / Chen et al.; the emitted token at every position is distributed as p.

All functions are batched: every row accepts its own number of tokens, with no host
synchronization (the counts stay on the device until the caller needs them).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from qwen3_fast.generate import cpu_step
from qwen3_fast.generate.sampling import apply_penalties, filtered_candidates


@dataclass
class QuantSpecConfig:
    """Self-speculative decoding settings (``LLM(..., speculative=QuantSpecConfig())``).

    gamma: draft tokens per verification step, or "auto" to pick it from the measured
        acceptance rate and step costs (:class:`GammaController`), within [1, max_gamma].
    draft_kv_bits: the KV view the draft reads (4: the upper nibbles of the 8-bit cache).
    draft_weight_bits: 16 (draft uses the model's weights) or 4 (group-wise int4 weights for
        the MLP projections, torch's int4 weight-only kernels).
    group_size: quantization group of the KV cache and of the int4 weights.
    max_gamma: upper bound for "auto" and the cache's speculative headroom.
    """

    gamma: Union[int, str] = 4
    draft_kv_bits: int = 4
    draft_weight_bits: int = 16
    group_size: int = 128
    max_gamma: int = 8

    def __post_init__(self):
        if self.gamma != "auto" and (isinstance(self.gamma, bool) or not isinstance(self.gamma, int)
                                     or self.gamma < 1):
            raise ValueError(f"gamma must be an int >= 1 or 'auto', got {self.gamma!r}")
        if isinstance(self.max_gamma, bool) or not isinstance(self.max_gamma, int) or self.max_gamma < 1:
            raise ValueError(f"max_gamma must be an int >= 1, got {self.max_gamma!r}")
        if isinstance(self.gamma, int) and self.gamma > self.max_gamma:
            raise ValueError(f"gamma ({self.gamma}) must be <= max_gamma ({self.max_gamma})")
        if self.draft_kv_bits not in (4, 8):
            raise ValueError(f"draft_kv_bits must be 4 or 8, got {self.draft_kv_bits!r}")
        if self.draft_weight_bits not in (4, 16):
            raise ValueError(f"draft_weight_bits must be 4 or 16, got {self.draft_weight_bits!r}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size < 1):
            raise ValueError(f"group_size must be an int >= 1, got {self.group_size!r}")

    @property
    def initial_gamma(self) -> int:
        return min(4, self.max_gamma) if self.gamma == "auto" else int(self.gamma)


def _check_draft(draft_tokens: Tensor) -> tuple[int, int]:
    if not isinstance(draft_tokens, Tensor) or draft_tokens.dim() != 2:
        raise ValueError("draft_tokens must be a [B, gamma] integer tensor, got "
                         f"{getattr(draft_tokens, 'shape', type(draft_tokens))}")
    if draft_tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"draft_tokens must be int32 or int64, got {draft_tokens.dtype}")
    return draft_tokens.shape[0], draft_tokens.shape[1]


def greedy_accept(draft_tokens: Tensor, target_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Longest matching prefix plus the target's next token.

    Parameters
    ----------
    draft_tokens : [B, gamma] int64, the draft's proposals.
    target_tokens : [B, gamma + 1] int64, the target's greedy choice after each prefix
        (position i is the token the target emits after the first i draft tokens).

    Returns
    -------
    n_accepted : [B] int64 in [0, gamma]
    next_token : [B] int64, ``target_tokens[b, n_accepted[b]]``
    """
    b, g = _check_draft(draft_tokens)
    if target_tokens.shape != (b, g + 1):
        raise ValueError(f"target_tokens must have shape [B, gamma + 1] = [{b}, {g + 1}], got "
                         f"{tuple(target_tokens.shape)}")
    match = (draft_tokens == target_tokens[:, :g]).to(torch.int64)
    n = match.cumprod(dim=1).sum(dim=1)
    return n, target_tokens.gather(1, n.view(-1, 1)).view(-1)


def _uniform(shape: tuple, generators: Optional[Sequence[Optional[torch.Generator]]],
             device) -> Tensor:
    """[B, ...] uniforms in [0, 1); row b drawn from generators[b] when given."""
    if generators is None or all(g is None for g in generators):
        return torch.rand(shape, device=device)
    return torch.stack([torch.rand(shape[1:], device=device, generator=g) for g in generators])


def _sample_rows(probs: Tensor, generators: Optional[Sequence[Optional[torch.Generator]]]) -> Tensor:
    """One index per row of probs [B, V] (rows need not be normalized)."""
    # exponential race: argmax p / E with E ~ Exp(1) picks index i with probability p_i / sum p
    u = _uniform(tuple(probs.shape), generators, probs.device)
    e = -torch.log1p(-u)  # Exp(1); log1p(-u) is finite because u < 1
    return (probs / e).argmax(dim=-1)


def rejection_accept(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
                     generators: Optional[Sequence[Optional[torch.Generator]]] = None
                     ) -> tuple[Tensor, Tensor]:
    """Speculative rejection sampling: the emitted tokens are distributed as the target's.

    Parameters
    ----------
    draft_tokens : [B, gamma] int64, x_i drawn from draft_probs[:, i].
    draft_probs : [B, gamma, V] float, q_i (each row sums to 1 over V).
    target_probs : [B, gamma + 1, V] float, p_i after the first i draft tokens.
    generators : optional per-row torch.Generator (seeded requests); None uses the global RNG.

    Returns
    -------
    n_accepted : [B] int64 in [0, gamma]
    next_token : [B] int64: a draw from norm(max(p_n - q_n, 0)) at the first rejection n,
        or from p_gamma when every draft token was accepted.
    """
    b, g = _check_draft(draft_tokens)
    if draft_probs.dim() != 3 or draft_probs.shape[:2] != (b, g):
        raise ValueError(f"draft_probs must have shape [B, gamma, V] = [{b}, {g}, V], got "
                         f"{tuple(draft_probs.shape)}")
    v = draft_probs.shape[2]
    if target_probs.shape != (b, g + 1, v):
        raise ValueError(f"target_probs must have shape [B, gamma + 1, V] = [{b}, {g + 1}, {v}], "
                         f"got {tuple(target_probs.shape)}")
    p = target_probs.float()
    q = draft_probs.float()
    idx = draft_tokens.long().unsqueeze(-1)
    p_x = p[:, :g].gather(2, idx).squeeze(-1)
    q_x = q.gather(2, idx).squeeze(-1)
    u = _uniform((b, g), generators, p.device)
    # accept iff u < p/q, written without the division (q_x > 0 for a token the draft drew;
    # q_x == 0 would mean the caller's draw was impossible, and then u * 0 < p_x accepts
    # only tokens the target allows).
    accept = (u * q_x < p_x).to(torch.int64)
    n = accept.cumprod(dim=1).sum(dim=1)
    # Distribution of the next token: residual at the first rejection, p_gamma otherwise.
    q_pad = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # q_gamma = 0 -> residual = p_gamma
    rows = torch.arange(b, device=p.device)
    p_n, q_n = p[rows, n], q_pad[rows, n]
    residual = (p_n - q_n).clamp_min(0)
    # p == q exactly gives a zero residual; a rejection then had probability 0, and p is the
    # correct fallback (keeps the draw well defined).
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_n, residual)
    return n, _sample_rows(residual, generators)


@dataclass
class SpeculativeStats:
    """Counters of one generation call (or one request)."""

    steps: int = 0              # verification passes
    drafted: int = 0            # draft tokens proposed (summed over rows)
    accepted: int = 0           # draft tokens kept
    emitted: int = 0            # tokens produced by speculative steps (accepted + 1 per row-step)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    gammas: list = field(default_factory=list)
    plain_steps: int = 0        # plain decode steps (the first; budget/room; auto's fallback)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens one row gains per verification step."""
        row_steps = self.emitted - self.accepted  # one next/bonus token per row-step
        return self.emitted / row_steps if row_steps else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step,
                "draft_seconds": self.draft_seconds, "verify_seconds": self.verify_seconds,
                "plain_steps": self.plain_steps, "gamma_mean": (sum(self.gammas) / len(self.gammas)) if self.gammas else 0.0}


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens per verification step with per-token acceptance alpha.

    1 + alpha + ... + alpha^gamma (the accepted prefix plus the target's token).
    """
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup_estimate(alpha: float, gamma: int, draft_cost: float, verify_cost: float,
                     plain_cost: float) -> float:
    """Estimated speedup over plain decoding: tokens per second, speculative / plain.

    draft_cost, verify_cost, plain_cost: seconds of one draft step, one verify pass over
    gamma + 1 positions, and one plain decode step.
    """
    step = gamma * draft_cost + verify_cost
    if step <= 0 or plain_cost <= 0:
        return 0.0
    return expected_tokens(alpha, gamma) * plain_cost / step


class GammaController:
    """Picks gamma from measured acceptance and step costs (``gamma="auto"``).

    Keeps exponential moving averages of the per-token acceptance rate, the cost of one
    draft step, of one verify pass and of one plain decode step, and chooses the gamma in
    [1, max_gamma] that maximizes expected tokens per second,
    ``expected_tokens(alpha, g) / (g * c_d + c_v)``. When even that best rate is below plain
    decoding's ``1 / c_plain`` (speculation does not pay: low acceptance, or a draft that is
    not much cheaper than the target, as on a CPU where a small model's attention is
    compute-bound), it answers 0: plain decode steps, ``probe_every`` of them, then one
    speculative step with the best gamma to measure again.
    """

    def __init__(self, max_gamma: int, initial: int = 4, decay: float = 0.8,
                 probe_every: int = 16):
        self.max_gamma = max_gamma
        self.gamma = max(1, min(initial, max_gamma))
        self.decay = decay
        self.probe_every = probe_every
        self.alpha: Optional[float] = None
        self.draft_cost: Optional[float] = None
        self.verify_cost: Optional[float] = None
        self.plain_cost: Optional[float] = None
        self.best = self.gamma  # the best speculative gamma, what a probe uses
        self.plain_left = 0  # plain steps before the next probe

    def _ema(self, old: Optional[float], new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float,
               gamma: int) -> int:
        """Record one speculative step (counts summed over rows); returns the gamma for the
        next step (0: plain decoding)."""
        if drafted > 0:
            self.alpha = self._ema(self.alpha, accepted / drafted)
        if gamma > 0:
            self.draft_cost = self._ema(self.draft_cost, draft_seconds / gamma)
        self.verify_cost = self._ema(self.verify_cost, verify_seconds)
        if self.alpha is None or not self.draft_cost or not self.verify_cost:
            return self.gamma
        alpha = min(self.alpha, 0.999)

        def rate(g):
            return expected_tokens(alpha, g) / (g * self.draft_cost + self.verify_cost)

        self.best = max(range(1, self.max_gamma + 1), key=rate)
        if self.plain_cost and rate(self.best) * self.plain_cost < 1.0:
            self.plain_left = self.probe_every
            self.gamma = 0
        else:
            self.gamma = self.best
        return self.gamma

    def update_plain(self, seconds: float) -> int:
        """Record one plain decode step; returns the gamma for the next step (0: plain)."""
        self.plain_cost = self._ema(self.plain_cost, seconds)
        if self.gamma == 0:
            self.plain_left -= 1
            if self.plain_left <= 0:
                self.gamma = self.best  # probe: measure speculation again
        return self.gamma


def _clone_state(state):
    """A copy of a PenaltyState (or None) that draft/verify positions can advance."""
    if state is None:
        return None
    twin = copy.copy(state)
    twin.counts = None if state.counts is None else state.counts.clone()
    twin.seen = None if state.seen is None else state.seen.clone()
    return twin


def full_probs(sampler, logits: Tensor, state) -> Tensor:
    """The sampling distribution of every row over the whole vocabulary.

    The same processing as ``BatchSampler.sample`` (penalties from `state`, temperature,
    top-k, top-p, min-p); greedy rows (temperature 0) get a one-hot at the argmax, which
    makes rejection sampling reduce to greedy acceptance for them.

    logits [B, V'] (V' >= sampler.vocab_size) -> probs [B, V] float32.
    """
    logits = logits[:, : sampler.vocab_size].float()
    logits = apply_penalties(logits, state, sampler.repetition, sampler.presence,
                             sampler.frequency)
    onehot = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    if sampler.all_greedy:
        return onehot
    cand, ids = filtered_candidates(logits, sampler.temperature, sampler.top_k, sampler.top_p,
                                    sampler.min_p, sampler.k_max)
    probs = torch.zeros_like(logits).scatter_(1, ids, cand)
    if any(sampler.greedy_rows):
        greedy = torch.tensor(sampler.greedy_rows, device=logits.device).view(-1, 1)
        probs = torch.where(greedy, onehot, probs)
    return probs


def speculative_step(model, cache, pending: Tensor, gamma: int, sampler,
                     config: QuantSpecConfig) -> tuple[Tensor, Tensor, float, float]:
    """One draft-verify-accept round for a batch; the cache ends exactly as plain decoding.

    Parameters
    ----------
    model : Qwen3ForCausalLM; cache : its HierarchicalKVCache (built with
        max_speculative_tokens >= gamma + 1).
    pending : [B] int64, each row's last chosen token, not yet in the cache.
    gamma : draft tokens this step.
    sampler : the batch's ``BatchSampler`` (its penalty state is read, not advanced: the
        caller observes the tokens it keeps).
    config : draft KV bits and draft weights.

    Returns
    -------
    tokens : [B, gamma + 1] int64; row b emits tokens[b, :n[b] + 1] (accepted drafts, then
        the target's correction or bonus token, which becomes the new pending token).
    n_accepted : [B] int64.
    draft_seconds, verify_seconds : wall time of the two phases.
    """
    from qwen3_fast.model.quant import draft_weights  # model/ is below generate/

    b = pending.shape[0]
    generators = sampler.generators
    state = _clone_state(sampler.state)
    t0 = time.perf_counter()
    drafts, qs = [], []
    tok = pending
    weights = draft_weights(model) if config.draft_weight_bits == 4 else contextlib.nullcontext()
    with weights:
        for _ in range(gamma):
            # the same logits, the layers in one C++ call (not with the int4 draft weights:
            # cpu_step sees use_draft and declines)
            logits = cpu_step.try_decode_logits(model, tok, cache, config.draft_kv_bits)
            if logits is None:
                logits = model(tok.view(b, 1), cache=cache,
                               precision=config.draft_kv_bits).logits[:, -1]
            q = full_probs(sampler, logits, state)
            tok = _sample_rows(q, generators)
            if state is not None:
                state.add_tokens(tok)
            drafts.append(tok)
            qs.append(q)
    cache.rollback([gamma] * b)  # the draft's keys/values came from the draft's activations
    draft_tokens = torch.stack(drafts, dim=1)  # [B, gamma]
    t1 = time.perf_counter()
    seq = torch.cat([pending.view(b, 1), draft_tokens], dim=1)
    logits = cpu_step.try_verify_logits(model, seq, cache, 8)  # one C++ call where it applies
    if logits is None:
        logits = model(seq, cache=cache, precision=8).logits  # [B, gamma + 1, V]
    state = _clone_state(sampler.state)
    ps = []
    for i in range(gamma + 1):
        ps.append(full_probs(sampler, logits[:, i], state))
        if state is not None and i < gamma:
            state.add_tokens(draft_tokens[:, i])
    n, nxt = rejection_accept(draft_tokens, torch.stack(qs, 1), torch.stack(ps, 1), generators)
    n_host = n.tolist()  # the per-row rollback needs the counts on the host
    cache.rollback([gamma - k for k in n_host])
    t2 = time.perf_counter()
    tokens = torch.cat([draft_tokens, torch.zeros_like(nxt).view(b, 1)], dim=1)
    tokens.scatter_(1, n.view(b, 1), nxt.view(b, 1))
    return tokens, n, t1 - t0, t2 - t1


def _summary(stats: SpeculativeStats, plain_cost: Optional[float]) -> dict:
    d = stats.as_dict()
    steps = max(stats.steps, 1)
    gamma = max(1, round(d["gamma_mean"])) if stats.gammas else 1
    d["plain_step_seconds"] = plain_cost
    d["speedup_estimate"] = (speedup_estimate(stats.acceptance_rate, gamma,
                                              stats.draft_seconds / steps / gamma,
                                              stats.verify_seconds / steps, plain_cost)
                             if plain_cost and stats.steps else None)
    return d


@torch.inference_mode()
def run_speculative_batch(llm, rows: list, prompts: Sequence[Sequence[int]], params: Sequence):
    """The engine's decode loop with self-speculative steps (``LLM(speculative=...)``).

    Same contract as ``LLM._run_batch`` (yields StreamEvents; rows are the engine's
    per-sequence states). Each iteration emits the pending token of every row, then either
    runs one :func:`speculative_step` (rows emit their accepted drafts now and the target's
    token next iteration) or one plain 8-bit step: the first step (its time is the baseline
    of the speedup estimate), steps where a row is being fed the thinking-budget sentence,
    and steps too close to max_seq_len for gamma + 1 new cache entries.
    """
    from qwen3_fast.generate.engine import decode_step, decode_thread_cap, prefill
    from qwen3_fast.generate.sampling import BatchSampler
    from qwen3_fast.ops._kernel_args import cpu_thread_cap

    model, dev, config = llm.model, llm.model.device, llm.speculative
    b = len(rows)
    sampler = BatchSampler(params, prompts, model.config.vocab_size, dev)
    cache = llm._cache(b)
    stats = SpeculativeStats()
    drafted, accepted = [0] * b, [0] * b
    ctrl = GammaController(config.max_gamma, config.initial_gamma) if config.gamma == "auto" else None
    gamma = config.initial_gamma
    plain_cost: Optional[float] = None
    t0 = time.perf_counter()
    tokens = sampler.sample(prefill(model, prompts, cache))  # [B] pending: not yet in the cache
    prefill_s = time.perf_counter() - t0
    t_decode = time.perf_counter()

    def event(r: int, delta: str):
        row = rows[r]
        spec = None
        if row.done:
            spec = _summary(stats, plain_cost)
            spec.update(drafted=drafted[r], accepted=accepted[r],
                        acceptance_rate=accepted[r] / drafted[r] if drafted[r] else 0.0)
        return llm._event(row, delta, prefill_s, time.perf_counter() - t_decode, spec)

    while True:
        forced_rows = [r for r, row in enumerate(rows) if row.forced and not row.done]
        if forced_rows:
            values = torch.tensor([rows[r].forced.pop(0) for r in forced_rows], device=dev)
            tokens = tokens.index_put((torch.tensor(forced_rows, device=dev),), values)
        sampler.observe(tokens)
        for r, tok in enumerate(tokens.tolist()):
            if not rows[r].done:
                delta = rows[r].push(tok, r in forced_rows)
                if delta or rows[r].done:
                    yield event(r, delta)
        if all(row.done for row in rows):
            return
        room = llm.max_seq_len - max(cache.seq_lengths())  # cache slots left in the fullest row
        g = min(gamma, room - 1)
        if plain_cost is None or g < 1 or any(row.forced and not row.done for row in rows):
            ts = time.perf_counter()
            logits = decode_step(model, tokens, cache)
            done = [1 if row.done else 0 for row in rows]
            if any(done):
                cache.rollback(done)  # finished rows keep their length (engine.py)
            tokens = sampler.sample(logits)
            seconds = time.perf_counter() - ts
            plain_cost = plain_cost or seconds
            stats.plain_steps += 1
            if ctrl is not None:
                gamma = ctrl.update_plain(seconds)
            continue
        with cpu_thread_cap(decode_thread_cap(model, cache)):
            out, n, t_draft, t_verify = speculative_step(model, cache, tokens, g, sampler, config)
        n_host, out_host = n.tolist(), out.tolist()
        live = [not row.done for row in rows]
        stats.steps += 1
        stats.gammas.append(g)
        stats.draft_seconds += t_draft
        stats.verify_seconds += t_verify
        stats.drafted += g * sum(live)
        stats.accepted += sum(k for k, a in zip(n_host, live) if a)
        stats.emitted += sum(k + 1 for k, a in zip(n_host, live) if a)
        rollback, used = [0] * b, [0] * b
        for r, row in enumerate(rows):
            if not live[r]:
                rollback[r] = n_host[r] + 1  # a finished row's cache length stays put
                continue
            drafted[r] += g
            accepted[r] += n_host[r]
            for i in range(n_host[r]):  # accepted drafts: already in the cache
                delta = row.push(out_host[r][i], False)
                used[r] = i + 1
                if delta or row.done:
                    yield event(r, delta)
                if row.done or row.forced:
                    # the rest of this row's drafts never happened (it stopped, or the
                    # thinking budget takes over from here)
                    rollback[r] = n_host[r] - used[r]
                    break
        for i in range(max(used)):
            sampler.observe(out[:, i], torch.tensor([i < u for u in used], device=dev))
        if any(rollback):
            cache.rollback(rollback)
        tokens = out.gather(1, n.view(-1, 1)).view(-1)
        if ctrl is not None:
            gamma = ctrl.update(g * sum(live), sum(k for k, a in zip(n_host, live) if a),
                                t_draft, t_verify, g)


__all__ = ["GammaController", "QuantSpecConfig", "SpeculativeStats", "expected_tokens",
           "full_probs", "greedy_accept", "rejection_accept", "run_speculative_batch",
           "speculative_step", "speedup_estimate"]
