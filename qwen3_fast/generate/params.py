"""Request-level data of the engine: :class:`SamplingParams`, the defaults they fall back to,
and the result types (:class:`RequestOutput`, :class:`StreamEvent`).

Defaults: a field left at None takes the checkpoint's ``generation_config.json`` value when
the file has it (``do_sample: false`` there means greedy), else the Qwen3 recommendation for
the mode (thinking: T 0.6, top-p 0.95, top-k 20, min-p 0; non-thinking: T 0.7, top-p 0.8,
top-k 20, min-p 0, presence penalty 1.5). ``temperature=0`` is greedy.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

THINKING_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0,
                             presence_penalty=1.5)
# Qwen3's sentence that closes an over-budget thinking block (the Qwen3 report / model card).
BUDGET_SENTENCE = ("Considering the limited time by the user, I have to give the solution "
                   "based on the thinking directly now.\n</think>\n\n")

_GEN_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "max_new_tokens")


@dataclass
class SamplingParams:
    """How to sample one request. None fields take the defaults (module docstring).

    temperature : >= 0 (0 = greedy)        top_p : (0, 1]           top_k : >= 0 (0 = off)
    min_p : [0, 1)                           presence_penalty / frequency_penalty : [-2, 2]
    repetition_penalty : > 0 (1 = off; HF semantics, prompt and output tokens)
    max_new_tokens : >= 1 (default: what fits in max_seq_len, at most 32768)
    stop : strings that end the reply (not included in the text)
    stop_token_ids : extra token ids that end the reply (the tokenizer's eos ids always do,
        unless ignore_eos)
    seed : seeds this request's own torch.Generator (reproducible, independent of the batch)
    """

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    max_new_tokens: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value (None fields are skipped)."""
        def num(name, ok, expect):
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be {expect}, got {v!r}")

        num("temperature", lambda v: v >= 0, "a number >= 0 (0 = greedy)")
        num("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        num("min_p", lambda v: 0 <= v < 1, "in [0, 1)")
        num("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        num("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        num("repetition_penalty", lambda v: v > 0, "> 0 (1 = off)")
        for name, low in (("top_k", 0), ("max_new_tokens", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")

    def resolved(self, defaults: dict) -> "SamplingParams":
        """A copy with every None sampling field taken from `defaults` (then neutral values)."""
        neutral = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                       frequency_penalty=0.0, repetition_penalty=1.0)
        values = {}
        for name, fallback in neutral.items():
            v = getattr(self, name)
            values[name] = v if v is not None else defaults.get(name, fallback)
        values["max_new_tokens"] = self.max_new_tokens if self.max_new_tokens is not None \
            else defaults.get("max_new_tokens")
        return dataclasses.replace(self, **values)


def load_generation_config(model_dir: str) -> dict:
    """The sampling fields of model_dir/generation_config.json ({} when absent).

    ``do_sample: false`` maps to temperature 0; ``eos_token_id`` (int or list) is returned
    as a list under "eos_token_id"."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    out = {k: raw[k] for k in _GEN_CONFIG_KEYS if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    eos = raw.get("eos_token_id")
    if eos is not None:
        out["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
    return out


def mode_defaults(generation_config: dict, enable_thinking: bool) -> dict:
    """generation_config.json values over the Qwen3 recommendation for the mode."""
    base = dict(THINKING_DEFAULTS if enable_thinking else NON_THINKING_DEFAULTS)
    base.update({k: v for k, v in generation_config.items() if k != "eos_token_id"})
    return base


@dataclass
class RequestOutput:
    """The result of one request.

    text : the reply (special tokens skipped; stop string / stop token excluded)
    token_ids : generated ids (a final stop token included, as transformers returns it)
    reasoning_content / content : text split at ``</think>`` (chat; reasoning None when the
        reply has no think block)
    finish_reason : "stop" (eos, stop token or stop string), "length" (max_new_tokens or the
        cache is full), or "budget" (the thinking budget cut the reasoning short and the
        answer then ended with a stop)
    """

    index: int
    prompt_token_ids: list
    text: str
    token_ids: list
    finish_reason: str
    reasoning_content: Optional[str] = None
    content: Optional[str] = None
    stop_reason: Optional[object] = None  # the stop string or token id that ended it
    thinking_budget_hit: bool = False
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # self-speculative decoding (LLM(speculative=...)): this request's drafted / accepted
    # counts and acceptance rate, plus the batch's steps, timings, mean gamma and speedup
    # estimate (generate/speculative.py)
    speculative: Optional[dict] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.completion_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return d


@dataclass
class StreamEvent:
    """One streamed piece: `text` is new reply text of request `index` (joined over the
    events of one index it equals the final ``output.text``); the last event of an index has
    `output` set."""

    index: int
    text: str
    token_ids: list
    output: Optional[RequestOutput] = None
