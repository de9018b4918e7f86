"""The inference engine: :class:`LLM` (generate / chat) over one model, tokenizer and KV cache.

Owns requests: prompts in, :class:`~qwen3_fast.generate.params.RequestOutput` (or streamed
:class:`~qwen3_fast.generate.params.StreamEvent`) out. Per batch of up to ``max_batch_size``
requests:

1. prefill: prompts right-padded into one ``[B, S]`` pass with an attention mask (the model's
   ragged cache path); the logits are taken at each prompt's last real token only (hidden
   state gathered before the LM head, so a ``[B, S, V]`` logits tensor never exists);
2. decode: one token per sequence per step, the batch shape fixed (finished sequences keep
   being fed, so the cache step stays uniform; their new cache entry is rolled back so their
   length stays put), sampling on device;
3. per-sequence stopping on the host: eos / stop token ids, stop strings across token
   boundaries (:class:`~qwen3_fast.generate.textstream.TextStream`), max_new_tokens, the
   cache's max_seq_len; the batch ends when every sequence has finished.

Host synchronization: the new tokens are copied to the host every ``sync_every`` steps. On
the CPU that is every step (the copy is free there, and stopping exactly saves work); on CUDA
it is every 8 steps unless streaming or a thinking budget needs each token as it comes (a
sequence that finished mid-window is simply cut; the extra steps cost less than 8 syncs).
The eager step below still synchronizes inside each step on CUDA: the cache's
``begin_step`` / ``rollback`` copy the Python lengths to the device, the model's RoPE table
size reads ``positions.max()``, flash-decode sizes its work from ``lengths.max()`` and the
reference RoPE checks the position range.

``cuda_graph=True`` (or QWEN3_FAST_CUDA_GRAPH=1) replaces that step by the device-side one of
:mod:`~qwen3_fast.generate.graph_step` (positions, cache writes, attention lengths, sampling
and the length update all on the device; the host advances its Python lengths by one per
running sequence, never reading them back; finished sequences are dropped by an ``active``
mask instead of a rollback), captured as one CUDA graph per (batch size, sampling
structure) and replayed per token; on the CPU it runs uncaptured. With it the per-token
host work on CUDA is: the graph replay, a device copy of the tokens, a pinned
non-blocking copy of ``active`` when a sequence finishes, and the window's token copy
every ``sync_every`` steps. It is OFF by default because no GPU has run it yet; it covers
dense caches of dense models (the int8 cache, MoE models and speculative decoding decode
eagerly).

On the CPU the decode step (:func:`decode_step`) runs all decoder layers of a dense bf16
model in one C++ call (:mod:`~qwen3_fast.generate.cpu_step`: the same kernels in the same
order, bitwise the eager logits, without ~35 us of Python per kernel call), over the bf16 and
the int8 cache alike; other models and steps run the eager model.

Thinking budget: once a sequence has generated ``thinking_budget`` tokens without ``</think>``
the engine feeds the tokens of :data:`~qwen3_fast.generate.params.BUDGET_SENTENCE` in place of
the sampled ones, one per step (keeping the batch's uniform step), then sampling resumes in
the answer.

Caches are preallocated per batch size (one per distinct size seen, ``max_seq_len`` long) and
reset between calls. No GPU has run this engine yet.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional, Sequence, Union

import torch

from qwen3_fast.generate import cpu_step
from qwen3_fast.generate.params import (BUDGET_SENTENCE, RequestOutput, SamplingParams,
                                        StreamEvent, load_generation_config, mode_defaults)
from qwen3_fast.generate.sampling import BatchSampler
from qwen3_fast.generate.textstream import TextStream
from qwen3_fast.ops._kernel_args import cpu_thread_cap

KV_CACHE_KINDS = {"bf16": "dense", "dense": "dense", "int8": "hierarchical",
                  "hierarchical": "hierarchical"}
MAX_DEFAULT_NEW_TOKENS = 32768


def prefill(model, prompts: Sequence[Sequence[int]], cache) -> torch.Tensor:
    """One batched pass over ragged prompts (right-padded, the model's cache path); returns
    the logits at each prompt's last token [B, V]. The LM head runs on those B hidden states
    only, so no [B, S, V] logits tensor is built."""
    dev = model.device
    b, lens = len(prompts), [len(p) for p in prompts]
    s = max(lens)
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, :len(p)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    hidden, _ = model.model(ids, mask if min(lens) < s else None, None, cache)  # [B, S, H]
    last = torch.tensor([n - 1 for n in lens], device=dev)
    return model.lm_head(hidden[torch.arange(b, device=dev), last])  # [B, V]


# Below this many KV-cache bytes per layer a CPU decode step runs its qwen3_fast kernels on
# one thread (torch's matmuls keep all threads): the per-row kernels (norms, RoPE, SwiGLU)
# and a short attention do microseconds of work, less than an OpenMP team costs, and on a
# busy machine a team member that is not scheduled stalls for a time slice (measured on the
# 2-core CI machine under load: add_rms_norm [1, 1024] 15 ms with 2 threads, 0.5 ms with 1).
# Kernels that stream at least 1 MiB per call (the weight GEMVs of ops.linear, attention over
# a long cache) ignore the cap (_kernel_args.UNCAPPED_STREAM_BYTES): capping those made a
# Qwen3-0.6B decode step 1.6x slower on a quiet machine (162 vs 100 ms median).
SMALL_STEP_KV_BYTES = 8 << 20


def decode_thread_cap(model, cache) -> Optional[int]:
    """The kernel thread cap for the next decode step (None: no cap)."""
    if model.device.type != "cpu":
        return None
    per_layer = cache.batch_size * max(cache.seq_lengths()) * cache.bytes_per_token()
    return 1 if per_layer < SMALL_STEP_KV_BYTES else None


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """tokens [B] -> next-token logits [B, V] (one token per sequence through the cache)."""
    with cpu_thread_cap(decode_thread_cap(model, cache)):
        logits = cpu_step.try_decode_logits(model, tokens, cache)  # CPU: the layers in one call
        if logits is not None:
            return logits
        return model(tokens.view(-1, 1), cache=cache).logits[:, -1]


class _Row:
    """Host-side state of one sequence in a running batch."""

    def __init__(self, index, prompt, params, stop_ids, tokenizer, budget, think_end, limit):
        self.index, self.prompt, self.params = index, list(prompt), params
        self.stop_ids, self.budget, self.think_end = stop_ids, budget, think_end
        self.limit = limit  # max tokens this row may generate
        self.stream = TextStream(tokenizer, params.stop)
        self.ids: list[int] = []
        self.forced: list[int] = []
        self.budget_hit = False
        self.thinking_done = think_end is None
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.sent = 0  # tokens already reported in stream events

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, forced: bool) -> str:
        """Append one token; returns the text delta. Sets finish_reason when it ends."""
        self.ids.append(token)
        if token == self.think_end:
            self.thinking_done = True
        if not forced and token in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", token
            return self.stream.finish()
        delta = self.stream.add(token)
        if self.stream.stopped_by is not None:
            self.finish_reason, self.stop_reason = "stop", self.stream.stopped_by
        elif len(self.ids) >= self.limit:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            return delta + self.stream.finish()
        if (self.budget is not None and not self.thinking_done and not self.forced
                and not self.budget_hit and len(self.ids) >= self.budget):
            self.budget_hit = True
            self.forced = list(self._sentence)
        return delta

    _sentence: Sequence[int] = ()


class LLM:
    """Qwen3 inference over a local HF checkpoint directory (config.json, safetensors,
    tokenizer.json; generation_config.json optional).

    Parameters
    ----------
    model_dir : checkpoint directory
    dtype : parameter dtype (None: as stored); device : "cpu" (default) or "cuda"
    kv_cache : "bf16" (dense cache in the model dtype) or "int8" (hierarchical QuantSpec cache
        read at 8 bits)
    max_batch_size : requests decoded together (bigger inputs run in several batches)
    max_seq_len : prompt + reply tokens per sequence (the cache length)
    group_size : quantization group G of the int8 cache
    speculative : a :class:`~qwen3_fast.generate.speculative.QuantSpecConfig` for
        self-speculative decoding (needs kv_cache="int8"; its group_size replaces
        `group_size`), or None for plain decoding
    cuda_graph : decode with the device-side step (generate/graph_step.py), captured as a
        CUDA graph on CUDA; None reads QWEN3_FAST_CUDA_GRAPH ("1": on). Off by default: not
        yet run on a GPU. Dense caches of dense models only (others decode eagerly).
    """

    def __init__(self, model_dir: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                 device=None, kv_cache: str = "bf16", max_batch_size: int = 8,
                 max_seq_len: int = 4096, group_size: int = 128, speculative=None,
                 cuda_graph: Optional[bool] = None):
        from qwen3_fast.generate.speculative import QuantSpecConfig
        from qwen3_fast.model import Qwen3ForCausalLM
        from qwen3_fast.tokenizer import Qwen3Tokenizer

        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir!r} has no config.json (expected a Hugging Face "
                                    "Qwen3 checkpoint directory)")
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be 'bf16' or 'int8', got {kv_cache!r}")
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if speculative is not None:
            if not isinstance(speculative, QuantSpecConfig):
                raise TypeError("speculative must be a qwen3_fast.QuantSpecConfig or None, got "
                                f"{type(speculative).__name__}")
            if KV_CACHE_KINDS[kv_cache] != "hierarchical":
                raise ValueError("speculative decoding drafts from the 4-bit view of the "
                                 "hierarchical cache: use kv_cache='int8'")
            group_size = speculative.group_size
        self.model_dir = model_dir
        self._setup(Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype, device=device),
                    Qwen3Tokenizer.from_pretrained(model_dir), load_generation_config(model_dir),
                    kv_cache, max_batch_size, max_seq_len, group_size, speculative, cuda_graph)

    @classmethod
    def from_model(cls, model, tokenizer, generation_config: Optional[dict] = None,
                   kv_cache: str = "bf16", max_batch_size: int = 8, max_seq_len: int = 4096,
                   group_size: int = 128, cuda_graph: Optional[bool] = None) -> "LLM":
        """An engine over a model already in memory (training rollouts: GRPO, on-policy
        distillation). The engine reads the live weights, so it always generates with the
        current policy; it runs under inference_mode and never changes them.

        Parameters
        ----------
        model : a Qwen3ForCausalLM (any device and dtype; train or eval mode)
        tokenizer : the model's Qwen3Tokenizer
        generation_config : sampling defaults (the fields of generation_config.json)
        """
        from qwen3_fast.model import Qwen3ForCausalLM

        if not isinstance(model, Qwen3ForCausalLM):
            raise TypeError(f"model must be a Qwen3ForCausalLM, got {type(model).__name__}")
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be 'bf16' or 'int8', got {kv_cache!r}")
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self = cls.__new__(cls)
        self.model_dir = None
        self._setup(model, tokenizer, dict(generation_config or {}), kv_cache, max_batch_size,
                    max_seq_len, group_size, None, cuda_graph)
        return self

    def _setup(self, model, tokenizer, generation_config: dict, kv_cache: str,
               max_batch_size: int, max_seq_len: int, group_size: int, speculative,
               cuda_graph: Optional[bool] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.kv_cache, self.cache_kind = kv_cache, KV_CACHE_KINDS[kv_cache]
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len, self.model.config.max_position_embeddings)
        self.group_size = group_size
        self.sync_every = 1 if self.model.device.type != "cuda" else 8
        self.speculative = speculative
        if speculative is not None and speculative.draft_weight_bits == 4:
            from qwen3_fast.model.quant import attach_draft_weights, draft_group_size

            attach_draft_weights(self.model, draft_group_size(self.model, 128))
        self._caches: dict[int, object] = {}
        if cuda_graph is None:
            cuda_graph = os.environ.get("QWEN3_FAST_CUDA_GRAPH", "0") == "1"
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool or None, got {type(cuda_graph).__name__}")
        self.cuda_graph = cuda_graph
        self._graph_runner = None
        if self.cuda_graph and speculative is None:
            from qwen3_fast.generate.graph_step import GraphDecodeRunner

            self._graph_runner = GraphDecodeRunner(self.model)
        eos = list(self.tokenizer.eos_token_ids) + list(self.generation_config.get("eos_token_id", []))
        cfg_eos = self.model.config.eos_token_id
        eos += [cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])
        self.eos_token_ids = tuple(dict.fromkeys(int(t) for t in eos))
        self._budget_ids = self.tokenizer.encode(BUDGET_SENTENCE)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 stream: bool = False, enable_thinking: bool = True,
                 thinking_budget: Optional[int] = None):
        """Continue raw prompts: a str, a list of str, a list of token ids, or a list of such
        lists. Returns one RequestOutput per prompt (a list), or with stream=True an iterator
        of StreamEvent. ``enable_thinking`` only selects the default sampling mode here."""
        ids = self._encode_prompts(prompts)
        return self._submit(ids, sampling, [enable_thinking] * len(ids), thinking_budget, stream)

    def chat(self, messages, enable_thinking: bool = True, thinking_budget: Optional[int] = None,
             tools: Optional[list] = None,
             sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             stream: bool = False):
        """Reply to one conversation (a list of {"role", "content"} dicts) or a batch of them.

        Returns a RequestOutput (one conversation) or a list of them; with stream=True an
        iterator of StreamEvent. ``thinking_budget``: thinking tokens allowed before the
        engine closes the think block (see the module docstring)."""
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batched else [messages]
        ids = [self.tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking) for c in convs]
        budget = thinking_budget if enable_thinking else None
        out = self._submit(ids, sampling, [enable_thinking] * len(ids), budget, stream)
        if stream or batched:
            return out
        return out[0]

    # ------------------------------------------------------------------ requests
    def _encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            return [self.tokenizer.encode(prompts)]
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [prompts]
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.tokenizer.encode(p))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                out.append(list(p))
            else:
                raise TypeError(f"prompts[{i}] must be a str or a list of token ids, got "
                                f"{type(p).__name__}")
        return out

    def _check_prompts(self, ids: list[list[int]]) -> None:
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("no prompts given")
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_seq_len is "
                                 f"{self.max_seq_len} (prompt + at least one new token)")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")

    def _resolve(self, sampling, n: int, thinking: Sequence[bool]) -> list[SamplingParams]:
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * n
        sampling = list(sampling)
        if len(sampling) != n:
            raise ValueError(f"got {len(sampling)} SamplingParams for {n} prompts")
        out = []
        for p, think in zip(sampling, thinking):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling must be SamplingParams, got {type(p).__name__}")
            out.append(p.resolved(mode_defaults(self.generation_config, think)))
        return out

    def _submit(self, ids, sampling, thinking, budget, stream):
        self._check_prompts(ids)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 0):
            raise ValueError(f"thinking_budget must be an int >= 0, got {budget!r}")
        if budget is not None and self.tokenizer.think_end_id is None:
            raise ValueError("thinking_budget needs a tokenizer with a </think> token")
        params = self._resolve(sampling, len(ids), thinking)
        events = self._run(ids, params, budget, stream)
        if stream:
            return events
        outs = [e.output for e in events if e.output is not None]
        return sorted(outs, key=lambda o: o.index)

    def _run(self, ids, params, budget, stream: bool) -> Iterator[StreamEvent]:
        step = self.max_batch_size
        for start in range(0, len(ids), step):
            yield from self._run_batch(list(range(start, min(start + step, len(ids)))),
                                       ids[start:start + step], params[start:start + step],
                                       budget, stream)

    def _cache(self, batch_size: int):
        cache = self._caches.get(batch_size)
        if cache is None:
            extra = ({} if self.speculative is None else
                     {"max_speculative_tokens": self.speculative.max_gamma + 1})
            cache = self.model.new_cache(batch_size, self.max_seq_len, self.cache_kind,
                                         group_size=self.group_size, **extra)
            self._caches[batch_size] = cache
        cache.reset()
        return cache

    # ------------------------------------------------------------------ the loop
    def _rows(self, indices, prompts, params, budget) -> list:
        rows = []
        for i, p, sp in zip(indices, prompts, params):
            room = self.max_seq_len - len(p)
            limit = min(sp.max_new_tokens or min(MAX_DEFAULT_NEW_TOKENS, room), room)
            stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_token_ids))
            row = _Row(i, p, sp, stop_ids, self.tokenizer, budget, self.tokenizer.think_end_id,
                       limit)
            row._sentence = self._budget_ids
            rows.append(row)
        return rows

    @torch.inference_mode()
    def _run_batch(self, indices, prompts, params, budget, stream) -> Iterator[StreamEvent]:
        if self.speculative is not None:
            from qwen3_fast.generate.speculative import run_speculative_batch

            yield from run_speculative_batch(self, self._rows(indices, prompts, params, budget),
                                             prompts, params)
            return
        model, dev = self.model, self.model.device
        b = len(prompts)
        rows = self._rows(indices, prompts, params, budget)
        sampler = BatchSampler(params, prompts, model.config.vocab_size, dev)
        cache = self._cache(b)
        t0 = time.perf_counter()
        tokens = sampler.sample(prefill(model, prompts, cache))  # [B]
        runner = self._graph_runner  # device-side step (cuda_graph=True): no rollback
        bound = runner.bind(cache, sampler) if runner and runner.supports(cache) else None
        first = True
        prefill_s = decode_s = 0.0
        t_decode = t0
        # the budget forces tokens and streaming shows each one: both need every step
        sync_every = 1 if (budget is not None or stream) else self.sync_every
        pending: list[torch.Tensor] = []
        max_steps = max(r.limit for r in rows)
        for step in range(max_steps):
            forced_rows = [r for r, row in enumerate(rows) if row.forced and not row.done]
            if forced_rows:
                values = torch.tensor([rows[r].forced.pop(0) for r in forced_rows], device=dev)
                tokens = tokens.index_put((torch.tensor(forced_rows, device=dev),), values)
            sampler.observe(tokens)
            pending.append(tokens)
            last_step = step == max_steps - 1
            if len(pending) >= sync_every or last_step or first:  # first: time to 1st token
                window = torch.stack(pending, 1).tolist()  # [B, k]: the host sync
                pending = []
                now = time.perf_counter()
                if first:
                    prefill_s, t_decode, first = now - t0, now, False
                forced_set = set(forced_rows)
                for r, row in enumerate(rows):
                    for j, tok in enumerate(window[r]):
                        if row.done:
                            break
                        forced = r in forced_set and j == len(window[r]) - 1
                        delta = row.push(tok, forced)
                        if delta or row.done:
                            decode_s = time.perf_counter() - t_decode
                            yield self._event(row, delta, prefill_s, decode_s)
                if all(row.done for row in rows):
                    break
            if last_step:
                break
            if bound is not None:
                # a row goes on unless finished; one that produced `limit` tokens in this
                # window (not pushed yet) is finished for sure: it must not outgrow the cache
                active = [not row.done and len(row.ids) + len(pending) < row.limit
                          for row in rows]
                with cpu_thread_cap(decode_thread_cap(model, cache)):
                    tokens = bound.step(tokens, active)
                continue
            logits = decode_step(model, tokens, cache)
            # finished for sure: row.done, or (between host syncs, CUDA) `limit` tokens made
            done = [1 if row.done or len(row.ids) + len(pending) >= row.limit else 0
                    for row in rows]
            if any(done):
                # finished rows are still fed (uniform steps); dropping their new entry keeps
                # their cache length fixed, so a short finished prompt next to a long-running
                # one can never outgrow max_seq_len
                cache.rollback(done)
            tokens = sampler.sample(logits)

    def _event(self, row: _Row, delta: str, prefill_s: float, decode_s: float,
               speculative: Optional[dict] = None) -> StreamEvent:
        new_ids, row.sent = row.ids[row.sent:], len(row.ids)
        if not row.done:
            return StreamEvent(row.index, delta, new_ids)
        from qwen3_fast.chat_format import parse_reasoning

        text = row.stream.text
        reasoning, content = parse_reasoning(text)
        reason = row.finish_reason
        if row.budget_hit and reason == "stop":
            reason = "budget"
        out = RequestOutput(index=row.index, prompt_token_ids=row.prompt, text=text,
                            token_ids=list(row.ids), finish_reason=reason,
                            reasoning_content=reasoning, content=content,
                            stop_reason=row.stop_reason, thinking_budget_hit=row.budget_hit,
                            prefill_seconds=prefill_s, decode_seconds=decode_s,
                            speculative=speculative)
        return StreamEvent(row.index, delta, new_ids, out)
