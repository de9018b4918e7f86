"""Data of strong-to-weak distillation: prompt sets, the teacher's off-policy samples, the
teacher's top-k annotation and the packed KD rows.

- Prompts: RL-prompt JSONL records (contracts: ``messages`` ending with a user turn, or
  ``prompt``; optional ``enable_thinking``). A ``/think`` or ``/no_think`` flag in the last
  user turn wins over ``enable_thinking`` (the later flag when both appear), as in Qwen3.
- Teacher samples (:func:`generate_teacher_data`): one engine ``chat`` call per batch of
  (prompt, mode, sample) units, written as chat samples (``{"messages": [...prompt,
  assistant]}``; a non-thinking reply has ``reasoning_content: ""``, which the chat format
  renders as the empty ``<think>\\n\\n</think>\\n\\n`` block). Resumable: after every batch
  the file is flushed and ``<file>.progress.json`` records the units done and the byte size;
  a rerun truncates to that size and continues; a finished file has ``<file>.done.json``
  holding the settings it was made with, so a rerun with the same settings reuses it.
- Top-k annotation (:func:`annotate_topk`): per sample, the ids of sft_data.tokenize_chat
  (exactly the tokens the student trains on) are scored by the teacher and its top-k next
  tokens stored for every reply token, one JSONL line per sample, same order.
- :class:`KDPackedStream`: the samples with their top-k, packed like sft_data's
  ChatPackedStream (whole samples, padding at the row end, per-sample positions and document
  ids) plus ``kd_ids`` / ``kd_logprobs`` [seq_len][k] aligned with the hidden positions
  (row t = the teacher's distribution of token t + 1).
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from qwen3_fast.train.data import IGNORE_INDEX, _files, _rng_state, _set_rng_state
from qwen3_fast.train.sft_data import tokenize_chat

MODES = {"thinking": True, "non_thinking": False}
_FLAG = re.compile(r"/(no_think|think)\b")


@dataclass
class Prompt:
    messages: list
    enable_thinking: Optional[bool]  # None: the prompt leaves the mode open
    answer: Optional[str] = None


def prompt_mode(record: dict, messages: list) -> Optional[bool]:
    """The mode a prompt asks for: the last /think or /no_think flag of the last user turn,
    else its ``enable_thinking`` field, else None."""
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    flags = _FLAG.findall((last_user or {}).get("content") or "")
    if flags:
        return flags[-1] == "think"
    value = record.get("enable_thinking")
    return None if value is None else bool(value)


def load_prompts(paths: list[str]) -> list[Prompt]:
    """Every record of the JSONL files (globs allowed), in order."""
    out = []
    for pattern in paths:
        for path in _files(pattern):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{n}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: not valid JSON ({e})") from None
                    if "messages" in record:
                        messages = record["messages"]
                    elif isinstance(record.get("prompt"), str):
                        messages = [{"role": "user", "content": record["prompt"]}]
                    else:
                        raise ValueError(f"{where}: an RL prompt needs 'messages' or 'prompt'")
                    if not messages or messages[-1].get("role") != "user":
                        raise ValueError(f"{where}: the prompt's messages must end with a "
                                         "user turn")
                    out.append(Prompt(messages, prompt_mode(record, messages),
                                      record.get("answer")))
    if not out:
        raise ValueError(f"no prompts in {paths}")
    return out


def chat_sample(messages: list, output, thinking: bool) -> dict:
    """A chat sample (contracts) from the prompt and an engine RequestOutput."""
    if thinking:
        reasoning = output.reasoning_content or ""
        content = output.content if output.reasoning_content is not None else output.text
    else:  # the prompt held the empty think block; the reply is the answer
        reasoning, content = "", output.text
    return {"messages": list(messages) + [{"role": "assistant", "content": content,
                                           "reasoning_content": reasoning}]}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def generate_teacher_data(engine, prompts: list[Prompt], path: str, modes: list[str],
                          respect_prompt_mode: bool, samples_per_prompt: int, sampling: dict,
                          seed: int, batch_size: int, keep_truncated: bool,
                          settings: dict) -> dict:
    """Write the teacher's chat samples to `path` (resumable; module docstring).

    engine : an LLM (``.chat``); sampling : SamplingParams fields (None: the engine's mode
    defaults); settings : what identifies the data (checked against a finished file).
    Returns the ``.done.json`` summary (samples, dropped, per mode counts)."""
    from qwen3_fast.generate.params import SamplingParams

    done_file, prog_file = path + ".done.json", path + ".progress.json"
    if os.path.isfile(done_file) and os.path.isfile(path):
        with open(done_file, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("settings") != settings:
            raise ValueError(f"{path} was generated with other settings ({done.get('settings')}"
                             f" vs {settings}); delete it or use another output_dir")
        return done
    units = []  # (prompt index, thinking, sample index): mode-major, so batches share a mode
    for mode in modes:
        for i, p in enumerate(prompts):
            if respect_prompt_mode and p.enable_thinking is not None and \
                    p.enable_thinking != MODES[mode]:
                continue
            units += [(i, MODES[mode], j) for j in range(samples_per_prompt)]
    state = {"units": 0, "bytes": 0, "samples": 0, "dropped": 0, "thinking": 0,
             "non_thinking": 0, "settings": settings}
    if os.path.isfile(prog_file) and os.path.isfile(path):
        with open(prog_file, encoding="utf-8") as f:
            prev = json.load(f)
        if prev.get("settings") == settings:
            state = prev
    with open(path, "ab") as fh:
        fh.truncate(state["bytes"])  # drop lines written after the last recorded batch
        fh.seek(state["bytes"])
        pos = state["units"]
        while pos < len(units):
            batch = [units[pos]]
            while (pos + len(batch) < len(units) and len(batch) < batch_size
                   and units[pos + len(batch)][1] == batch[0][1]):
                batch.append(units[pos + len(batch)])
            thinking = batch[0][1]
            params = [SamplingParams(**sampling, seed=seed * 1_000_003 + pos + n)
                      for n in range(len(batch))]
            outs = engine.chat([prompts[i].messages for i, _, _ in batch],
                               enable_thinking=thinking, sampling=params)
            for (i, _, _), out in zip(batch, outs):
                if out.finish_reason == "length" and not keep_truncated:
                    state["dropped"] += 1
                    continue
                rec = chat_sample(prompts[i].messages, out, thinking)
                fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                state["samples"] += 1
                state["thinking" if thinking else "non_thinking"] += 1
            fh.flush()
            os.fsync(fh.fileno())
            pos += len(batch)
            state["units"], state["bytes"] = pos, fh.tell()
            _write_json(prog_file, state)
    if state["samples"] == 0:
        raise ValueError(f"the teacher produced no usable sample ({state['dropped']} truncated "
                         "replies dropped); raise sampling.max_new_tokens or set "
                         "keep_truncated: true")
    _write_json(done_file, state)
    os.remove(prog_file)
    return state


def read_samples(path: str) -> list[list]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def _right_pad(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)


@torch.no_grad()
def annotate_topk(teacher, tokenizer, samples_path: str, out_path: str, k: int,
                  batch_size: int = 8, chunk_size: Optional[int] = None) -> int:
    """Store the teacher's top-k next tokens for every reply token of every sample.

    Line n of `out_path` is ``{"ids": [[k ids] per reply token], "logprobs": [[k floats]]}``
    for sample n, in the order of the sample's label tokens (sft_data.tokenize_chat). Right
    padding needs no attention mask (causal attention never looks right). Reused when a
    ``.done.json`` says it was made with this k for this many samples."""
    from qwen3_fast.train.distill_losses import teacher_topk

    samples = read_samples(samples_path)
    done_file = out_path + ".done.json"
    want = {"k": k, "samples": len(samples), "bytes": os.path.getsize(samples_path)}
    if os.path.isfile(done_file) and os.path.isfile(out_path):
        with open(done_file, encoding="utf-8") as f:
            if json.load(f) == want:
                return len(samples)
    dev = teacher.device
    with open(out_path + ".tmp", "w", encoding="utf-8") as fh:
        for s in range(0, len(samples), batch_size):
            encoded = [tokenize_chat(m, tokenizer) for m in samples[s:s + batch_size]]
            ids = _right_pad([e[0] for e in encoded], tokenizer.pad_token_id).to(dev)
            hidden = teacher(ids, return_logits=False).hidden_states  # [B, S, H]
            for r, (seq, labels) in enumerate(encoded):
                # hidden t predicts token t + 1: the rows before each labelled token
                rows = [t - 1 for t in range(1, len(seq)) if labels[t] != IGNORE_INDEX]
                tid, tlp = teacher_topk(hidden[r, rows], teacher.lm_head.weight, k, chunk_size)
                fh.write(json.dumps({"ids": tid.tolist(),
                                     "logprobs": [[round(x, 5) for x in row]
                                                  for row in tlp.tolist()]}) + "\n")
    os.replace(out_path + ".tmp", out_path)
    _write_json(done_file, want)
    return len(samples)


class KDPackedStream:
    """Endless packed rows of (sample, teacher top-k) pairs, shuffled per epoch (seeded).

    Rows: input_ids, labels, position_ids, document_ids (as sft_data's ChatPackedStream) plus
    kd_ids / kd_logprobs [seq_len][k]: row t holds the teacher's top-k for token t + 1 where
    labels[t + 1] != -100, zeros elsewhere (masked out by the shifted labels). Samples longer
    than seq_len are dropped (counted in ``dropped``)."""

    def __init__(self, samples_path: str, topk_path: str, tokenizer, seq_len: int, k: int,
                 seed: int):
        samples = read_samples(samples_path)
        with open(topk_path, encoding="utf-8") as f:
            topk = [json.loads(line) for line in f if line.strip()]
        if len(topk) != len(samples):
            raise ValueError(f"{topk_path} has {len(topk)} lines for {len(samples)} samples")
        self.items = []
        self.dropped = 0
        for n, (m, t) in enumerate(zip(samples, topk)):
            ids, labels = tokenize_chat(m, tokenizer)
            n_lab = sum(1 for y in labels[1:] if y != IGNORE_INDEX)
            if len(t["ids"]) != n_lab or (t["ids"] and len(t["ids"][0]) != k):
                raise ValueError(f"{topk_path} line {n + 1}: top-k of {len(t['ids'])} tokens "
                                 f"(k={len(t['ids'][0]) if t['ids'] else '?'}) for a sample "
                                 f"with {n_lab} reply tokens and k={k}; re-annotate")
            if len(ids) > seq_len:
                self.dropped += 1
                continue
            self.items.append((ids, labels, t["ids"], t["logprobs"]))
        if not self.items:
            raise ValueError(f"no sample of {samples_path} fits data.seq_len={seq_len}")
        self.seq_len, self.k, self.pad = seq_len, k, tokenizer.pad_token_id
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0
        self.pending: Optional[int] = None
        self.rows_served = 0

    def _next_index(self) -> int:
        if self.pos >= len(self.order):
            if self.order:  # a finished pass over the samples
                self.epoch += 1
            self.order = list(range(len(self.items)))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]

    def next_row(self) -> dict:
        n, k = self.seq_len, self.k
        row = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": [],
               "kd_ids": [], "kd_logprobs": []}
        doc = 0
        while len(row["input_ids"]) < n:
            if self.pending is None:
                self.pending = self._next_index()
            ids, labels, tid, tlp = self.items[self.pending]
            start = len(row["input_ids"])
            if start + len(ids) > n:
                pad = n - start
                row["input_ids"] += [self.pad] * pad
                row["labels"] += [IGNORE_INDEX] * pad
                row["position_ids"] += list(range(pad))
                row["document_ids"] += [doc] * pad
                row["kd_ids"] += [[0] * k] * pad
                row["kd_logprobs"] += [[0.0] * k] * pad
                break
            self.pending = None
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += list(range(len(ids)))
            row["document_ids"] += [doc] * len(ids)
            it = iter(range(len(tid)))
            for t in range(len(ids)):  # hidden t carries the distribution of token t + 1
                if t + 1 < len(ids) and labels[t + 1] != IGNORE_INDEX:
                    j = next(it)
                    row["kd_ids"].append(tid[j])
                    row["kd_logprobs"].append(tlp[j])
                else:
                    row["kd_ids"].append([0] * k)
                    row["kd_logprobs"].append([0.0] * k)
            doc += 1
        self.rows_served += 1
        return row

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_row()

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "order": list(self.order), "pos": self.pos,
                "epoch": self.epoch, "pending": self.pending, "rows_served": self.rows_served}

    def load_state_dict(self, state: dict) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.order, self.pos, self.epoch = list(state["order"]), state["pos"], state["epoch"]
        self.pending, self.rows_served = state["pending"], state["rows_served"]


__all__ = ["KDPackedStream", "MODES", "Prompt", "annotate_topk", "chat_sample",
           "generate_teacher_data", "load_prompts", "prompt_mode", "read_samples"]
