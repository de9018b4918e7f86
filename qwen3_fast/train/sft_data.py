"""SFT data: chat samples rendered in the Qwen3 chat format, loss on the final reply only.

Pipeline (one :class:`ChatPackedStream`, identical on every rank, like data.py's PackedStream):
  sources (train/data.py JSONL / Parquet / ``datasets``; each source reads the record's
  ``messages`` list, ``SourceConfig.messages_field``, "messages" unless set)
  -> weighted mixer (a seeded ``random.Random`` picks the source of each sample)
  -> :func:`tokenize_chat`: the conversation rendered with ``chat_format.render_chat`` and
     tokenized, labels on the final assistant turn only
  -> packer: fixed rows of ``seq_len`` tokens holding WHOLE samples. ``position_ids`` restart
     at 0 per sample, ``document_ids`` number the samples of a row (attention never crosses
     them). A sample never straddles two rows: when the next one does not fit, the rest of
     the row is padding (pad token, label -100, its own document) and the sample opens the
     next row. A sample longer than ``seq_len`` is dropped and counted (a RuntimeWarning at
     the 1st, 2nd, 4th, 8th, ... drop), or cut at ``seq_len`` with ``overlong="truncate"``.

Exactly the engine's tokens. A sample ``messages = [..., user, assistant]`` becomes
``ids = encode(P) + encode(R) + encode("\\n")`` where ``P = render_chat(messages[:-1],
add_generation_prompt=True)`` is the prompt the engine builds for the same conversation
(``LLM.chat`` -> ``tokenizer.apply_chat_template``) and ``R`` is the reply the model must
generate: ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>`` (the empty block
``<think>\\n\\n</think>\\n\\n`` when the reasoning is empty: a non-thinking answer; with
``enable_thinking=False`` the engine puts that empty block in the prompt instead, and the
text is the same). ``P + R + "\\n"`` equals ``render_chat(messages)``; the split is checked
and, since every boundary is an added token (``assistant\\n`` | ``<think>``, ``<|im_end|>`` |
``\\n``), the ids equal the tokenization of the whole text. Labels: the ids of ``R``
(think block, answer and the closing ``<|im_end|>``), -100 everywhere else (system, user,
earlier turns, the ``<|im_start|>assistant\\n`` header, the trailing newline, padding).
Labels are not shifted (the model shifts).

Earlier assistant turns of a multi-turn sample are context only (label -100). Qwen3's
template renders them WITHOUT their reasoning (history form), which is not what the model
emits when it answers (every generated reply opens with a think block, empty or not), so
training on them would teach replies without a think block. To learn every turn, split a
conversation into one sample per assistant turn offline (each ends at its turn).

Resumable: :meth:`ChatPackedStream.state_dict` is JSON (the sources' positions, the mixer's
RNG, the sample waiting for the next row and the counters), so a checkpoint continues the
exact row sequence.
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Iterator, Optional

from qwen3_fast import chat_format
from qwen3_fast.train.config import DataConfig
from qwen3_fast.train.data import (IGNORE_INDEX, TextSource, _rng_state, _set_rng_state,
                                   open_source)

OVERLONG = ("drop", "truncate")


def split_reply(messages: list[dict], tools: Optional[list] = None) -> tuple[str, str, str]:
    """(prompt, reply, tail) with ``prompt + reply + tail == render_chat(messages)``.

    prompt is the engine's generation prompt for ``messages[:-1]`` (thinking mode), reply
    the final assistant turn as the model generates it (think block, answer, ``<|im_end|>``),
    tail the newline the template puts after it.
    """
    if not messages or not isinstance(messages[-1], dict) or \
            messages[-1].get("role") != "assistant":
        raise ValueError("an SFT sample must end with an assistant message (the reply to "
                         "learn); got " + (repr(messages[-1].get("role")) if messages and
                                           isinstance(messages[-1], dict) else "none"))
    full = chat_format.render_chat(messages, tools)
    prompt = chat_format.render_chat(messages[:-1], tools, add_generation_prompt=True,
                                     enable_thinking=True)
    tail = "\n"
    if not (full.startswith(prompt) and full.endswith(chat_format.IM_END + tail)):
        raise ValueError("the rendered conversation does not extend the generation prompt of "
                         "its history; cannot locate the final reply")
    return prompt, full[len(prompt):-len(tail)], tail


def tokenize_chat(messages: list[dict], tokenizer, tools: Optional[list] = None
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat sample; labels = ids on the final reply, else -100."""
    prompt, reply, tail = split_reply(messages, tools)
    p, r, t = tokenizer.encode(prompt), tokenizer.encode(reply), tokenizer.encode(tail)
    return p + r + t, [IGNORE_INDEX] * len(p) + list(r) + [IGNORE_INDEX] * len(t)


class ChatPackedStream:
    """Endless packed rows of whole chat samples from the weighted sources of `cfg`.

    Parameters
    ----------
    cfg : DataConfig (sources, seq_len, seed; ``append_eos`` and ``length_mix`` are not
        used: a sample ends with ``<|im_end|>\\n`` as in the chat format)
    tokenizer : Qwen3Tokenizer (encode, pad_token_id)
    overlong : "drop" (default; counted, warned) or "truncate" (cut at seq_len, which may
        cut the answer and its ``<|im_end|>``)
    sources : prebuilt sources (tests); default: opened from cfg with messages_field
        "messages" where unset
    """

    MAX_CONSECUTIVE_DROPS = 10_000  # every sample too long: fail instead of looping forever

    def __init__(self, cfg: DataConfig, tokenizer, overlong: str = "drop",
                 sources: Optional[list[TextSource]] = None):
        if overlong not in OVERLONG:
            raise ValueError(f"overlong: expected 'drop' or 'truncate', got {overlong!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.overlong = overlong
        if sources is None:
            sources = [open_source(dataclasses.replace(
                s, messages_field=s.messages_field or "messages")) for s in cfg.sources]
        self.sources = sources
        self.weights = [s.weight for s in cfg.sources] or [1.0] * len(self.sources)
        self.mix_rng = random.Random(cfg.seed)
        self.pad_id = tokenizer.pad_token_id
        self.pending: Optional[list[list[int]]] = None  # [ids, labels] waiting for a row
        self.rows_served = 0
        self.samples = 0  # samples packed
        self.dropped = 0  # samples longer than seq_len, dropped
        self.truncated = 0

    # one sample --------------------------------------------------------
    def next_sample(self) -> tuple[list[int], list[int]]:
        """The next sample that fits a row: (input_ids, labels)."""
        n = self.cfg.seq_len
        for _ in range(self.MAX_CONSECUTIVE_DROPS):
            src = self.mix_rng.choices(range(len(self.sources)), weights=self.weights)[0]
            messages = self.sources[src].next_text()
            try:
                ids, labels = tokenize_chat(messages, self.tokenizer)
            except ValueError as e:
                raise ValueError(f"data source {self.cfg.sources[src].path!r}: {e}") from None
            if len(ids) <= n:
                return ids, labels
            if self.overlong == "truncate" and any(y != IGNORE_INDEX for y in labels[:n]):
                self.truncated += 1
                return ids[:n], labels[:n]
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...
                warnings.warn(f"SFT data: dropped a {len(ids)}-token sample longer than "
                              f"data.seq_len={n} ({self.dropped} dropped so far, "
                              f"{self.samples} packed); raise seq_len or set "
                              "overlong=truncate", RuntimeWarning, stacklevel=2)
        raise ValueError(f"{self.MAX_CONSECUTIVE_DROPS} samples in a row are longer than "
                         f"data.seq_len={n}; raise seq_len")

    # one row -----------------------------------------------------------
    def next_row(self) -> dict[str, list[int]]:
        """{"input_ids", "labels", "position_ids", "document_ids"}: lists of seq_len ints."""
        n = self.cfg.seq_len
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        docs: list[int] = []
        doc = 0
        while len(ids) < n:
            if self.pending is None:
                self.pending = list(self.next_sample())
            s_ids, s_labels = self.pending
            if len(ids) + len(s_ids) > n:
                if not ids:  # cannot happen (next_sample fits a row); guard the invariant
                    raise AssertionError("a sample longer than seq_len reached the packer")
                pad = n - len(ids)  # the sample opens the next row; pad this one
                ids.extend([self.pad_id] * pad)
                labels.extend([IGNORE_INDEX] * pad)
                positions.extend(range(pad))
                docs.extend([doc] * pad)
                break
            self.pending = None
            self.samples += 1
            ids.extend(s_ids)
            labels.extend(s_labels)
            positions.extend(range(len(s_ids)))
            docs.extend([doc] * len(s_ids))
            doc += 1
        self.rows_served += 1
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "document_ids": docs}

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_row()

    # resume ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"sources": [s.state_dict() for s in self.sources],
                "mix_rng": _rng_state(self.mix_rng),
                "pending": None if self.pending is None else [list(x) for x in self.pending],
                "rows_served": self.rows_served, "samples": self.samples,
                "dropped": self.dropped, "truncated": self.truncated}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"data state has {len(state['sources'])} sources; this config has "
                             f"{len(self.sources)}")
        for src, s in zip(self.sources, state["sources"]):
            src.load_state_dict(s)
        _set_rng_state(self.mix_rng, state["mix_rng"])
        self.pending = None if state["pending"] is None else [list(x) for x in state["pending"]]
        for k in ("rows_served", "samples", "dropped", "truncated"):
            setattr(self, k, state[k])


__all__ = ["ChatPackedStream", "OVERLONG", "split_reply", "tokenize_chat"]
