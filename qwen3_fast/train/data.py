"""Pre-training data: text sources, weighted mixing, tokenization and packing.

Pipeline (one :class:`PackedStream`, identical on every rank):
  sources (JSONL / Parquet files, a ``datasets`` dataset; each loops over epochs)
  -> weighted mixer (a seeded ``random.Random`` picks the source of each document)
  -> tokenizer (+ EOS) -> optional length mix (S3: draws a length bucket by weight, then
     takes the next document of that length; documents of other lengths are skipped, so
     the mix is exact but data that lacks a bucket fails loudly instead of drifting)
  -> packer: fixed rows of ``seq_len`` tokens holding several documents. ``position_ids``
     restart at 0 per document, ``document_ids`` number the documents of a row (the model's
     attention never crosses them) and the label of each document's first token is -100,
     so no document predicts its successor. A document cut at a row end continues in the
     next row as a new segment (positions from 0 again).

Resumable: :meth:`PackedStream.state_dict` is JSON (per-source file and offset and epoch,
the RNG states and the packer's pending tokens), so a checkpoint continues the exact row
sequence. Ranks read the same global stream and each keeps its share of rows
(:func:`global_batch`), so the state does not depend on the number of ranks.
Departure: streaming, no global shuffle; shuffle the files offline for real runs.
"""
from __future__ import annotations

import glob
import json
import os
import random
from typing import Iterator, Optional

import torch

from qwen3_fast.train.config import DataConfig, SourceConfig

IGNORE_INDEX = -100


# ------------------------------------------------------------------ sources
class TextSource:
    """A list of documents read in order, looping over epochs; position is resumable."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.epoch = 0

    def next_text(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise FileNotFoundError(f"data source {pattern!r}: no such file "
                                f"{missing[0] if missing else pattern!r}")
    return files


def _text_of(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where}: record has no text field {field!r}")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} is {type(text).__name__}, expected str")
    return text


def _document_of(record: object, cfg: SourceConfig, where: str):
    """A record's document: its text, or (``messages_field`` set: SFT) its messages list."""
    if not cfg.messages_field:
        return _text_of(record, cfg.text_field, where)
    if not isinstance(record, dict) or cfg.messages_field not in record:
        raise ValueError(f"{where}: record has no messages field {cfg.messages_field!r}")
    messages = record[cfg.messages_field]
    if not isinstance(messages, list):
        raise ValueError(f"{where}: field {cfg.messages_field!r} is {type(messages).__name__}, "
                         "expected a list of messages")
    return messages


class JsonlSource(TextSource):
    """One JSON object per line; position = (file index, byte offset)."""

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self.files = _files(cfg.path)
        self.file_idx, self.offset = 0, 0
        self._fh = None

    def _open(self):
        if self._fh is None:
            self._fh = open(self.files[self.file_idx], "rb")
            self._fh.seek(self.offset)
        return self._fh

    def next_text(self) -> str:
        empty_pass = 0
        while True:
            fh = self._open()
            line = fh.readline()
            if not line:
                fh.close()
                self._fh = None
                self.file_idx, self.offset = self.file_idx + 1, 0
                if self.file_idx == len(self.files):
                    self.file_idx, self.epoch = 0, self.epoch + 1
                    empty_pass += 1
                    if empty_pass > 1:
                        raise ValueError(f"data source {self.cfg.path!r} has no documents")
                continue
            self.offset = fh.tell()
            if not line.strip():
                continue
            where = f"{self.files[self.file_idx]} (byte {self.offset - len(line)})"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            return _document_of(record, self.cfg, where)

    def state_dict(self) -> dict:
        return {"file_idx": self.file_idx, "offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.file_idx, self.offset, self.epoch = state["file_idx"], state["offset"], state["epoch"]


class ParquetSource(TextSource):
    """Parquet files read one row group at a time; position = (file index, row)."""

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"data source {cfg.path!r} is Parquet, which needs pyarrow: "
                              "pip install pyarrow") from None
        self._pq = pq
        self.files = _files(cfg.path)
        self.file_idx, self.row = 0, 0
        self._texts: Optional[list[str]] = None  # the current file's column (read lazily)

    def _column(self) -> list[str]:
        if self._texts is None:
            column = self.cfg.messages_field or self.cfg.text_field
            table = self._pq.read_table(self.files[self.file_idx], columns=[column])
            self._texts = table.column(column).to_pylist()
        return self._texts

    def next_text(self) -> str:
        for _ in range(2 * len(self.files) + 1):
            texts = self._column()
            if self.row < len(texts):
                text = texts[self.row]
                self.row += 1
                where = f"{self.files[self.file_idx]} row {self.row - 1}"
                if self.cfg.messages_field:  # a list of message structs
                    return _document_of({self.cfg.messages_field: text}, self.cfg, where)
                if not isinstance(text, str):
                    raise ValueError(f"{where}: {self.cfg.text_field!r} is not a string")
                return text
            self._texts, self.row = None, 0
            self.file_idx += 1
            if self.file_idx == len(self.files):
                self.file_idx, self.epoch = 0, self.epoch + 1
        raise ValueError(f"data source {self.cfg.path!r} has no documents")

    def state_dict(self) -> dict:
        return {"file_idx": self.file_idx, "row": self.row, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["file_idx"] != self.file_idx:
            self._texts = None
        self.file_idx, self.row, self.epoch = state["file_idx"], state["row"], state["epoch"]


class DatasetsSource(TextSource):
    """A Hugging Face ``datasets`` dataset (load_dataset, or load_from_disk for a dir)."""

    def __init__(self, cfg: SourceConfig, dataset=None):
        super().__init__(cfg)
        if dataset is None:
            try:
                import datasets
            except ImportError:
                raise ImportError(f"data source {cfg.path!r} is a datasets dataset, which "
                                  "needs the datasets package: pip install datasets") from None
            if os.path.isdir(cfg.path) and os.path.isfile(os.path.join(cfg.path,
                                                                       "dataset_info.json")):
                dataset = datasets.load_from_disk(cfg.path)
            else:
                dataset = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
        self.dataset = dataset
        if len(dataset) == 0:
            raise ValueError(f"data source {cfg.path!r} has no documents")
        self.index = 0

    def next_text(self) -> str:
        if self.index >= len(self.dataset):
            self.index, self.epoch = 0, self.epoch + 1
        record = self.dataset[self.index]
        self.index += 1
        return _document_of(record, self.cfg, f"{self.cfg.path}[{self.index - 1}]")

    def state_dict(self) -> dict:
        return {"index": self.index, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.epoch = state["index"], state["epoch"]


def open_source(cfg: SourceConfig) -> TextSource:
    kind = cfg.kind
    if kind == "auto":
        path = cfg.path.lower()
        if path.endswith((".jsonl", ".json")):
            kind = "jsonl"
        elif path.endswith(".parquet"):
            kind = "parquet"
        else:
            kind = "datasets"
    if kind == "jsonl":
        return JsonlSource(cfg)
    if kind == "parquet":
        return ParquetSource(cfg)
    return DatasetsSource(cfg)


# ------------------------------------------------------------------ tokenizer
def load_tokenizer(spec: str):
    """A Qwen3Tokenizer from a directory, or the small test tokenizer for "test"."""
    if spec == "test":
        from qwen3_fast.tokenizer_train import build_test_tokenizer

        return build_test_tokenizer()
    if not spec:
        raise ValueError("data.tokenizer is empty; expected a tokenizer directory or 'test'")
    from qwen3_fast.tokenizer import Qwen3Tokenizer

    return Qwen3Tokenizer.from_pretrained(spec)


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


# ------------------------------------------------------------------ the stream
class PackedStream:
    """Endless packed rows from the mixed, tokenized sources of a :class:`DataConfig`."""

    MAX_SKIPS = 100_000  # documents skipped looking for one length bucket before giving up

    def __init__(self, cfg: DataConfig, tokenizer, sources: Optional[list[TextSource]] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sources = sources if sources is not None else [open_source(s) for s in cfg.sources]
        self.weights = [s.weight for s in cfg.sources] or [1.0] * len(self.sources)
        self.mix_rng = random.Random(cfg.seed)
        self.length_rng = random.Random(cfg.seed + 1)
        self.pending: list[int] = []  # tokens of the document being packed
        self.eos = tokenizer.eos_token_id if cfg.append_eos else None
        self.rows_served = 0

    # one document ------------------------------------------------------
    def _next_document(self) -> list[int]:
        src = self.mix_rng.choices(range(len(self.sources)), weights=self.weights)[0]
        ids = list(self.tokenizer.encode(self.sources[src].next_text()))
        if self.eos is not None:
            ids.append(self.eos)
        return ids

    def next_document(self) -> list[int]:
        buckets = self.cfg.length_mix
        if not buckets:
            return self._next_document()
        b = self.length_rng.choices(buckets, weights=[x.weight for x in buckets])[0]
        for _ in range(self.MAX_SKIPS):
            ids = self._next_document()
            if b.min_tokens <= len(ids) < b.max_tokens:
                return ids
        raise ValueError(f"no document of {b.min_tokens} <= tokens < {b.max_tokens} in "
                         f"{self.MAX_SKIPS} draws; the sources lack this length bucket")

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
            if not self.pending:
                self.pending = self.next_document()
                if not self.pending:
                    continue
            take = self.pending[: n - len(ids)]
            self.pending = self.pending[len(take):]
            ids.extend(take)
            labels.append(IGNORE_INDEX)  # no document predicts its successor's first token
            labels.extend(take[1:])
            positions.extend(range(len(take)))
            docs.extend([doc] * len(take))
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
                "mix_rng": _rng_state(self.mix_rng), "length_rng": _rng_state(self.length_rng),
                "pending": list(self.pending), "rows_served": self.rows_served}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"data state has {len(state['sources'])} sources; this config has "
                             f"{len(self.sources)}")
        for src, s in zip(self.sources, state["sources"]):
            src.load_state_dict(s)
        _set_rng_state(self.mix_rng, state["mix_rng"])
        _set_rng_state(self.length_rng, state["length_rng"])
        self.pending = list(state["pending"])
        self.rows_served = state["rows_served"]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows -> int64 tensors [B, S] per field."""
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}


def global_batch(stream: PackedStream, rows: int, rank: int, world: int
                 ) -> tuple[list[dict], int]:
    """The next `rows * world` rows of the global stream: rank r keeps rows r, r+world, ...;
    also returns the global batch's target count (the loss normalizer). Every rank advances
    the stream identically, so its state is rank-independent."""
    all_rows = [stream.next_row() for _ in range(rows * world)]
    return all_rows[rank::world], count_targets(all_rows)


def count_targets(rows: list[dict]) -> int:
    """Predicted tokens of rows: labels that survive the shift (position 0 never is one)."""
    return sum(sum(1 for y in r["labels"][1:] if y != IGNORE_INDEX) for r in rows)


__all__ = ["DatasetsSource", "IGNORE_INDEX", "JsonlSource", "PackedStream", "ParquetSource",
           "TextSource", "collate", "count_targets", "global_batch", "load_tokenizer",
           "open_source"]
