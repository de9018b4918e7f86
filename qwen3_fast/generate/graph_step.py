"""A decode step with no host read, and its CUDA-graph capture (opt-in, unverified on a GPU).

The engine's eager step (engine.decode_step: ``model(tokens, cache=cache)`` then
``BatchSampler.sample``) keeps the cache's lengths as Python ints: ``begin_step`` copies
them to the device every step, the RoPE table size reads ``positions.max()``, the dense
cache writes by host slicing and flash-decode sizes its splits from ``lengths.max()``. A
captured graph would freeze all of that. :class:`DeviceDecodeStep` does one decode step
for a batch with every per-step quantity on the device:

- positions = ``cache.lengths`` (int32 [B], device), clamped to max_length - 1;
- RoPE: the model's cos/sin tables for the whole cache (built up front), gathered at the
  device positions by ``ops.qk_norm_rope``;
- cache writes: ``index_copy_`` of each (sequence, kv head)'s new key / value row at its
  device position into the dense cache;
- attention: the ``qwen3_fast::flash_decode_dense`` op over the device lengths + 1, its
  work sized from ``max_length`` (a host constant) instead of ``lengths.max()``;
- LM head and sampling (penalties, greedy, temperature / top-k / top-p / min-p, the
  exponential-race draw) on the device; the per-row settings are tensors;
- ``cache.lengths += active`` on the device: ``active`` [B] int32 is 1 for sequences that
  go on and 0 for finished ones (their new entry is dropped, as the eager engine's
  rollback does).

The host's Python lengths are advanced by the caller (``cache.advance_host(active)``:
exactly one token per active sequence per step), never read back.

:class:`CapturedDecodeStep` records that step in a ``torch.cuda.CUDAGraph`` (warm-up on a
side stream, capture, then ``replay`` after ``copy_`` of the new tokens into the static
input); :class:`GraphDecodeRunner` keeps one graph per (cache, sampling structure) and is
what the engine calls with ``LLM(..., cuda_graph=True)`` or ``QWEN3_FAST_CUDA_GRAPH=1``.
On the CPU the same step runs without capture (that is what the CPU tests check: equal
tokens to the eager engine, and ``torch.compile(fullgraph=True)`` of the step, which
fails on any data-dependent host read). Off by default: no GPU has run the capture yet.

Scope: dense caches (``kv_cache="bf16"``) of dense models. Not supported (the engine
decodes eagerly): the int8 hierarchical cache (a step that crosses a group boundary
quantizes that group; doing it on the device would mean quantizing a candidate group of
every sequence in every step, masked, which has not been written), MoE models (the
reference MoE path groups tokens by expert on the host), speculative decoding. On CUDA the
ops run on their default backends (the torch reference paths until GPU_VERIFIED lists a
kernel), so the captured attention reads the whole max_length cache per step.

RNG: rows without a seed draw from torch's default generator (graph-safe by itself); a
seeded row draws from a generator of the graph registered with
``CUDAGraph.register_generator_state``, loaded with the row's generator state when a batch
binds, so replays continue the row's stream (unverified on a GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from qwen3_fast import ops
from qwen3_fast.generate.sampling import (BatchSampler, PenaltyState, apply_penalties, draw,
                                          filtered_candidates)
from qwen3_fast.model.layers import project
from qwen3_fast.ops import _backend
from qwen3_fast.ops.flash_decode import _flash_decode_dense

_ROW_PARAMS = ("temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency")
WARMUP_STEPS = 2


def unsupported_reason(model, cache) -> Optional[str]:
    """Why :class:`DeviceDecodeStep` cannot run `model` over `cache` (None: it can)."""
    from qwen3_fast.cache import DenseKVCache

    if not isinstance(cache, DenseKVCache):
        return (f"a {cache.format} cache (the device-side step writes dense caches only; the "
                "int8 cache quantizes groups on the host)")
    if model.config.is_moe:
        return "an MoE model (expert routing reads the token counts on the host)"
    if model.config.num_hidden_layers < 1:
        return "a model without layers"
    if cache.dtype != model.model.embed_tokens.weight.dtype:
        return f"a cache of dtype {cache.dtype} for a {model.model.embed_tokens.weight.dtype} model"
    return None


# ------------------------------------------------------------------ sampling
class SamplingTensors:
    """The per-row sampling settings of a batch as device tensors (what a step reads).

    Built from a :class:`~qwen3_fast.generate.sampling.BatchSampler`: ``static=False`` shares
    its tensors and generators (uncaptured steps); ``static=True`` owns copies that a captured
    graph reads, refilled by :meth:`load` for each new batch of the same structure
    (:meth:`structure`: what a graph bakes in: greedy-only or not, the candidate count,
    which penalty statistics exist, which rows are seeded).
    """

    def __init__(self, sampler: BatchSampler, static: bool = False):
        self.vocab_size, self.k_max = sampler.vocab_size, sampler.k_max
        self.all_greedy = sampler.all_greedy
        dev = sampler.temperature.device
        self.static = static
        if not static:
            for name in _ROW_PARAMS:
                setattr(self, name, getattr(sampler, name))
            self.state = sampler.state
            self.generators: list = list(sampler.generators)
            self.greedy_mask = torch.tensor(sampler.greedy_rows, device=dev)
            return
        for name in _ROW_PARAMS:
            setattr(self, name, getattr(sampler, name).clone())
        self.greedy_mask = torch.zeros(len(sampler.greedy_rows), dtype=torch.bool, device=dev)
        self.state = None
        if sampler.state is not None:
            self.state = PenaltyState.__new__(PenaltyState)
            for name in ("counts", "seen"):
                t = getattr(sampler.state, name)
                setattr(self.state, name, None if t is None else t.clone())
        self.generators = [None if g is None else torch.Generator(device=dev)
                           for g in sampler.generators]
        self.load(sampler)

    @staticmethod
    def structure(sampler: BatchSampler) -> tuple:
        state = sampler.state
        return (sampler.all_greedy, sampler.k_max,
                state is not None and state.counts is not None,
                state is not None and state.seen is not None,
                tuple(g is not None for g in sampler.generators))

    def load(self, sampler: BatchSampler) -> None:
        """Take over a new batch's settings (static copies only; same structure). The
        sampler's penalty statistics move into this object's tensors (its ``observe`` then
        updates what the graph reads) and each seeded row's generator state is copied."""
        for name in _ROW_PARAMS:
            getattr(self, name).copy_(getattr(sampler, name))
        self.greedy_mask.copy_(torch.tensor(sampler.greedy_rows))
        if sampler.state is not None:
            for name in ("counts", "seen"):
                mine = getattr(self.state, name)
                if mine is not None:
                    mine.copy_(getattr(sampler.state, name))
                    setattr(sampler.state, name, mine)
        for mine, g in zip(self.generators, sampler.generators):
            if mine is not None:
                mine.set_state(g.get_state())


def sample_on_device(s: SamplingTensors, logits: Tensor) -> Tensor:
    """logits [B, V] -> next tokens [B] int64: :meth:`BatchSampler.sample` with the greedy
    rows as a device mask (no host tensor built per step)."""
    logits = logits[:, : s.vocab_size].float()
    logits = apply_penalties(logits, s.state, s.repetition, s.presence, s.frequency)
    if s.all_greedy:
        return torch.argmax(logits, dim=-1)
    probs, ids = filtered_candidates(logits, s.temperature, s.top_k, s.top_p, s.min_p,
                                     s.k_max)
    tokens = ids.gather(1, draw(probs, s.generators).view(-1, 1)).view(-1)
    return torch.where(s.greedy_mask, torch.argmax(logits, dim=-1), tokens)


# ------------------------------------------------------------------ the step
class _CacheView:
    """What the model's attention layers see as ``cache`` during a device step: writes go
    to device positions, attention reads device lengths (layers.Qwen3Attention checks
    ``device_step``)."""

    device_step = True

    def __init__(self, cache, positions: Tensor, attn_lengths: Tensor):
        b, hkv, t = cache.batch_size, cache.num_kv_heads, cache.max_length
        self.cache = cache
        self.attn_lengths = attn_lengths  # [B] int32: lengths including this step's token
        heads = torch.arange(b * hkv, device=positions.device).view(b, hkv)
        self.rows = (heads * t + positions.view(b, 1)).view(-1)  # [B * Hkv] rows of [B*Hkv*T, D]

    def is_empty_before_step(self) -> bool:
        return False

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v: [B, Hkv, 1, D] -> the cache rows at the step's positions."""
        c = self.cache
        d = c.head_dim
        c.k[layer].view(-1, d).index_copy_(0, self.rows, k.reshape(-1, d).to(c.dtype))
        c.v[layer].view(-1, d).index_copy_(0, self.rows, v.reshape(-1, d).to(c.dtype))

    def attend(self, q: Tensor, layer: int, scale: float) -> Tensor:
        """q [B, Hq, 1, D] -> [B, Hq, 1, D] over keys [0, attn_lengths[b])."""
        c = self.cache
        return _flash_decode_dense(q, c.k[layer], c.v[layer], self.attn_lengths, float(scale),
                                   _backend.resolve("flash_decode", q), c.max_length)


class DeviceDecodeStep:
    """One decode step of `model` over a dense `cache` with no host read (module docstring).

    Parameters
    ----------
    model : a dense (non-MoE) Qwen3ForCausalLM
    cache : its DenseKVCache (model dtype); the step reads and advances ``cache.lengths``

    ``step(tokens, active, sampling)``: tokens [B, 1] int64 (the newest token of each
    sequence), active [B] int32 (1: keep the token, 0: finished, drop it), sampling a
    :class:`SamplingTensors` -> next tokens [B] int64. The caller advances the host lengths
    (``cache.advance_host(active)``).
    """

    def __init__(self, model, cache):
        why = unsupported_reason(model, cache)
        if why is not None:
            raise ValueError(f"DeviceDecodeStep cannot run {why}")
        self.model, self.cache = model, cache
        self.device = cache.lengths.device
        # built up front for the whole cache and held here: a later growth of the model's
        # table (a longer cache elsewhere) must not free what a captured graph reads
        self.cos, self.sin = model.model.rope_tables(cache.max_length, self.device)

    def hidden(self, tokens: Tensor, positions: Tensor, view: _CacheView) -> Tensor:
        """Qwen3Model.forward for one token per sequence: [B, 1] -> final normed [B, 1, H]."""
        inner = self.model.model
        x = inner.embed_tokens(tokens)
        residual = None
        for layer in inner.layers:
            x, residual, _ = layer(x, residual, self.cos, self.sin, positions, None, view, 16,
                                   None)
        if x.dtype != residual.dtype:  # autocast, as Qwen3Model.forward
            x = x.to(residual.dtype)
        x, _ = ops.add_rms_norm(x, residual, inner.norm.weight, inner.norm.variance_epsilon)
        return x

    def __call__(self, tokens: Tensor, active: Tensor, sampling: SamplingTensors) -> Tensor:
        cache = self.cache
        b = tokens.shape[0]
        lengths = cache.lengths  # [B] int32, before the step
        # a finished sequence may sit at max_length (it is fed, never kept): clamp its slot
        pos = torch.clamp(lengths, max=cache.max_length - 1).to(torch.int64)  # [B]
        attn_lengths = (pos + 1).to(torch.int32)
        view = _CacheView(cache, pos, attn_lengths)
        hidden = self.hidden(tokens, pos.view(b, 1), view)
        logits = project(self.model.lm_head, hidden)[:, -1]  # [B, V]
        cache.lengths.copy_(torch.where(active != 0, attn_lengths, lengths))
        return sample_on_device(sampling, logits)


# ------------------------------------------------------------------ CUDA graphs
class CapturedDecodeStep:
    """A :class:`DeviceDecodeStep` recorded in a CUDA graph, with static inputs.

    Capture: ``active`` is 0 while warming up (twice, on a side stream: lazy inits, cuBLAS
    workspaces) and capturing, so the cache lengths stay; the warm-up writes only the slot
    past each sequence's end, which the first real step overwrites. Seeded rows draw from
    generators registered with the graph (:class:`SamplingTensors` static copies).
    """

    def __init__(self, step: DeviceDecodeStep, sampler: BatchSampler):
        dev = step.device
        b = step.cache.batch_size
        self.step, self.cache = step, step.cache
        self.sampling = SamplingTensors(sampler, static=True)
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.active = torch.zeros(b, dtype=torch.int32, device=dev)
        self._active_host: Optional[list[int]] = None
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step(self.tokens, self.active, self.sampling)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        for g in self.sampling.generators:
            if g is not None:
                self.graph.register_generator_state(g)
        with torch.cuda.graph(self.graph):
            self.out = step(self.tokens, self.active, self.sampling)  # [B] int64, static
        self.sampling.load(sampler)  # the warm-up draws moved the seeded generators

    def bind(self, sampler: BatchSampler) -> None:
        """Use this graph for a new batch (same cache, same sampling structure)."""
        self.sampling.load(sampler)
        self._active_host = None

    def run(self, tokens: Tensor, active: Sequence[int]) -> Tensor:
        """tokens [B] int64 (device) -> next tokens [B] (a fresh tensor). No host sync:
        the tokens are copied on the device, a changed `active` from pinned memory."""
        active = list(active)
        if active != self._active_host:
            host = torch.tensor(active, dtype=torch.int32).pin_memory()
            self.active.copy_(host, non_blocking=True)
            self._active_host = active
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.out.clone()


class GraphDecodeRunner:
    """The engine's device-side decode: a :class:`DeviceDecodeStep` per cache, captured as
    a CUDA graph per (cache, sampling structure) on CUDA, run as is on the CPU.

    Per batch: ``bound = runner.bind(cache, sampler)``, then per step
    ``tokens = bound.step(tokens, active)`` with active[b] = 1 for sequences that go on.
    """

    def __init__(self, model):
        self.model = model
        self._steps: dict[int, DeviceDecodeStep] = {}
        self._graphs: dict[tuple, CapturedDecodeStep] = {}

    def supports(self, cache) -> bool:
        return unsupported_reason(self.model, cache) is None

    def bind(self, cache, sampler: BatchSampler) -> "_BoundStep":
        step = self._steps.get(id(cache))
        if step is None or step.cache is not cache:
            step = self._steps[id(cache)] = DeviceDecodeStep(self.model, cache)
        return _BoundStep(self, step, sampler)

    def _graph(self, step: DeviceDecodeStep, sampler: BatchSampler) -> CapturedDecodeStep:
        key = (id(step.cache), SamplingTensors.structure(sampler))
        graph = self._graphs.get(key)
        if graph is None or graph.cache is not step.cache:
            # each graph keeps its own memory pool: graphs of different batch sizes replay
            # in any order, which a shared pool does not allow
            graph = self._graphs[key] = CapturedDecodeStep(step, sampler)
        else:
            graph.bind(sampler)
        return graph


def _can_capture(sampler: BatchSampler) -> bool:
    """Seeded rows need CUDAGraph.register_generator_state (torch >= 2.6); without it such
    a batch runs the device-side step uncaptured."""
    seeded = any(g is not None for g in sampler.generators)
    return not seeded or hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class _BoundStep:
    """One batch's decode steps (see :class:`GraphDecodeRunner`)."""

    def __init__(self, runner: GraphDecodeRunner, step: DeviceDecodeStep,
                 sampler: BatchSampler):
        self.runner, self.step_fn, self.sampler = runner, step, sampler
        self.captured: Optional[CapturedDecodeStep] = None
        self.sampling: Optional[SamplingTensors] = None

    def step(self, tokens: Tensor, active: Sequence[bool]) -> Tensor:
        """tokens [B] int64 -> next tokens [B]; advances the cache (device and host)."""
        counts = [1 if a else 0 for a in active]
        cache = self.step_fn.cache
        if self.step_fn.device.type == "cuda" and _can_capture(self.sampler):
            if self.captured is None:  # captured lazily: the first step of the batch
                self.captured = self.runner._graph(self.step_fn, self.sampler)
            out = self.captured.run(tokens, counts)
        else:
            if self.sampling is None:
                self.sampling = SamplingTensors(self.sampler)
            out = self.step_fn(tokens.view(-1, 1),
                               torch.tensor(counts, dtype=torch.int32, device=tokens.device),
                               self.sampling)
        cache.advance_host(counts)
        return out
