"""RL prompt sets: JSONL files of prompt records, mixed by weight, resumable.

A record (contracts): ``{"messages": [...ending with a user turn] | "prompt": str,
"answer": str?, "task": str?, "enable_thinking": bool?}``. Each source is read whole into
memory (RL prompt sets are small: Qwen3's reasoning RL used 3,995 queries) and visited in a
fresh seeded permutation per epoch; a seeded ``random.Random`` picks the source of each
draw by weight (general RL's task mix). :meth:`PromptSource.state_dict` is JSON, so a
checkpoint continues the exact prompt sequence.
"""
from __future__ import annotations

import json
import random

from qwen3_fast.train.config import SourceConfig
from qwen3_fast.train.data import _files, _rng_state, _set_rng_state


def check_record(record: object, where: str) -> dict:
    """`record` if it is a valid RL prompt record, else ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    msgs = record.get("messages")
    if msgs is not None:
        if not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict)
                and msgs[-1].get("role") == "user"):
            raise ValueError(f"{where}: 'messages' must be a list ending with a user turn")
    elif not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: expected 'messages' (a list) or 'prompt' (a string)")
    if "enable_thinking" in record and not isinstance(record["enable_thinking"], bool):
        raise ValueError(f"{where}: 'enable_thinking' must be true or false")
    return record


def load_records(cfg: SourceConfig) -> list[dict]:
    """Every record of a JSONL source (a file or glob)."""
    if cfg.kind not in ("auto", "jsonl"):
        raise ValueError(f"RL prompt source {cfg.path!r}: only JSONL files are supported, got "
                         f"kind {cfg.kind!r}")
    out = []
    for path in _files(cfg.path):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                out.append(check_record(record, f"{path}:{n}"))
    if not out:
        raise ValueError(f"RL prompt source {cfg.path!r} has no records")
    return out


class PromptSource:
    """Endless weighted draws of prompt records from several sources."""

    def __init__(self, sources: list[SourceConfig], seed: int):
        if not sources:
            raise ValueError("data.sources: expected at least one prompt file")
        self.records = [load_records(s) for s in sources]
        self.weights = [s.weight for s in sources]
        self.seed = seed
        self.rng = random.Random(seed)
        self.pos = [0] * len(sources)
        self.epoch = [0] * len(sources)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, i: int) -> list[int]:
        key = (i, self.epoch[i])
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != i}
            order = list(range(len(self.records[i])))
            random.Random(f"{self.seed}/{i}/{self.epoch[i]}").shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def next(self) -> dict:
        """The next record (a shallow copy; callers may add keys)."""
        i = self.rng.choices(range(len(self.records)), weights=self.weights)[0] \
            if len(self.records) > 1 else 0
        record = self.records[i][self._order(i)[self.pos[i]]]
        self.pos[i] += 1
        if self.pos[i] == len(self.records[i]):
            self.pos[i], self.epoch[i] = 0, self.epoch[i] + 1
        return dict(record)

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "pos": list(self.pos), "epoch": list(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["pos"]) != len(self.records):
            raise ValueError(f"the checkpoint has {len(state['pos'])} prompt sources, the "
                             f"config {len(self.records)}")
        _set_rng_state(self.rng, state["rng"])
        self.pos, self.epoch = list(state["pos"]), list(state["epoch"])


__all__ = ["PromptSource", "check_record", "load_records"]
