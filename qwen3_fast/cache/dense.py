"""Dense KV cache: ``k[layer], v[layer]: [B, Hkv, T, D]`` in the model dtype, written in place.

Rollback is a length reset; nothing is cleared (stale slots are never read: kernels stop at
the length).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.cache.base import KVCacheBase


class DenseKVCache(KVCacheBase):
    format = "dense"
    precisions = (16,)

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, max_length, dtype, device)
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v: [B, Hkv, S, D]; sequence b stores its first counts[b] positions."""
        self._check_write(layer, k, v)
        if all(c == self._count[0] for c in self._count):
            c, s0 = self._count[0], self._start
            if c == 0:
                return
            if all(x == s0[0] for x in s0):
                self.k[layer, :, :, s0[0]:s0[0] + c] = k[:, :, :c]
                self.v[layer, :, :, s0[0]:s0[0] + c] = v[:, :, :c]
                return
        for b, (s, c) in enumerate(zip(self._start, self._count)):
            if c:
                self.k[layer, b, :, s:s + c] = k[b, :, :c]
                self.v[layer, b, :, s:s + c] = v[b, :, :c]

    def dequantized(self, layer: int, bits: int = 16) -> tuple[Tensor, Tensor]:
        """(k, v) [B, Hkv, T, D] in logical order (the reference path's view)."""
        t = max(self._len) if self._len else 0
        return self.k[layer, :, :, :t], self.v[layer, :, :, :t]

    def live_state(self) -> dict:
        """What a reader can see: "length" and, per sequence, k, v [L, Hkv, len, D]."""
        return {"length": list(self._len),
                "k": [self.k[:, b, :, :n].clone() for b, n in enumerate(self._len)],
                "v": [self.v[:, b, :, :n].clone() for b, n in enumerate(self._len)]}

    def bytes_per_token(self, bits: Optional[int] = None) -> float:
        return 2 * self.num_kv_heads * self.head_dim * self.k.element_size()

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
