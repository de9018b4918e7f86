"""Per-sequence length bookkeeping shared by the dense and hierarchical caches.

Lengths live twice: as Python ints (host logic: where to write, when to quantize) and as
an int32 device tensor (what the kernels read), kept in step by :meth:`_sync`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Counts = Union[int, Sequence[int], Tensor, None]


class KVCacheBase:
    format = "base"

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype, device):
        for name, val in (("num_layers", num_layers), ("batch_size", batch_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("max_length", max_length)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_kv_heads, self.head_dim, self.max_length = num_kv_heads, head_dim, max_length
        self.dtype, self.device = dtype, torch.device(device)
        self._len = [0] * batch_size  # committed lengths, host
        self._start = [0] * batch_size  # lengths before the current step
        self._count = [0] * batch_size  # tokens the current step adds
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------ steps
    def _counts(self, counts: Counts, name: str = "counts") -> list[int]:
        if counts is None:
            raise ValueError(f"{name} must be given")
        if isinstance(counts, Tensor):
            counts = counts.tolist()
        if isinstance(counts, int):
            counts = [counts] * self.batch_size
        counts = [int(c) for c in counts]
        if len(counts) != self.batch_size:
            raise ValueError(f"{name} has {len(counts)} entries; expected batch_size {self.batch_size}")
        if any(c < 0 for c in counts):
            raise ValueError(f"{name} must be >= 0, got {counts}")
        return counts

    def begin_step(self, counts: Counts) -> None:
        """Reserve counts[b] new tokens for sequence b; layers then call :meth:`write`."""
        self.advance_host(counts)
        self._sync()

    def advance_host(self, counts: Counts) -> None:
        """The host half of :meth:`begin_step`: the Python lengths only, `lengths` (device)
        untouched. For a step whose device side ran elsewhere: a device-side decode step
        (generate/graph_step.py) writes the cache and advances `lengths` itself."""
        counts = self._counts(counts)
        for b, c in enumerate(counts):
            if self._len[b] + c > self.max_length:
                raise ValueError(f"sequence {b}: {self._len[b]} + {c} tokens exceed max_length "
                                 f"{self.max_length}")
        self._start = list(self._len)
        self._count = counts
        self._len = [s + c for s, c in zip(self._start, counts)]
        self._on_lengths_changed()

    def seq_lengths(self) -> list[int]:
        return list(self._len)

    @property
    def step_start(self) -> list[int]:
        """Lengths before the current step (the positions the new tokens start at)."""
        return list(self._start)

    def is_empty_before_step(self) -> bool:
        return all(s == 0 for s in self._start)

    def rollback(self, n: Counts) -> None:
        """Drop the newest n[b] tokens of sequence b (an int applies to every sequence)."""
        n = self._counts(n, "n")
        for b, k in enumerate(n):
            if k > self._len[b]:
                raise ValueError(f"rollback: sequence {b} has {self._len[b]} tokens, cannot drop {k}")
            self._check_rollback(b, k)
        self._len = [length - k for length, k in zip(self._len, n)]
        self._start = [min(s, length) for s, length in zip(self._start, self._len)]
        self._on_rollback()
        self._sync()

    def reset(self) -> None:
        self._len = [0] * self.batch_size
        self._start = [0] * self.batch_size
        self._count = [0] * self.batch_size
        self._on_lengths_changed()
        self._sync()

    def _check_rollback(self, b: int, k: int) -> None:
        pass

    def _on_lengths_changed(self) -> None:
        pass

    def _on_rollback(self) -> None:
        pass

    def _sync(self) -> None:
        self.lengths.copy_(torch.tensor(self._len, dtype=torch.int32))

    def _check_write(self, layer: int, k: Tensor, v: Tensor) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, S, D], got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            s = t.shape[2]
            want = (self.batch_size, self.num_kv_heads, s, self.head_dim)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want}")
        if k.shape != v.shape:
            raise ValueError(f"v has shape {tuple(v.shape)}; expected k's {tuple(k.shape)}")
        s = k.shape[2]
        if any(c > s for c in self._count):
            raise ValueError(f"k has {s} positions but the step reserved {max(self._count)}")
        return s

    def bytes_per_token(self, bits: Optional[int] = None) -> float:
        """Bytes of cache storage per token per layer (all kv heads, keys and values)."""
        raise NotImplementedError
