"""Hierarchical (QuantSpec) KV cache: one store, read as 8-bit (target) or 4-bit (draft).

Format (DESIGN.md "KV caches", csrc/include/qwen3_fast/kv_quant_math.h): per group,
s = (max - min) / 15 and the exact 8-bit code c = round((x - min) / (s/16)) in [0, 240],
stored as U = (c + 8) >> 4 and L = c - 16U + 8 in separate nibble-packed arrays.
8-bit value c * s/16 + min (|err| <= s/32), 4-bit value U * s + min (|err| <= 17/32 s).

Per layer (leading dim of every tensor):
- keys, per channel over groups of G tokens:  k_u, k_l [B, Hkv, Tq, D/2] uint8,
  k_min, k_scale [B, Hkv, Tq/G, D] model dtype;
- values, per token over groups of Gv = min(G, D) along head_dim (QuantSpec: G = D = 128,
  one group per token): v_u, v_l [B, Hkv, Tq, D/2], v_min, v_scale [B, Hkv, Tq, D/Gv];
- full-precision ring buffer k_buf, v_buf [B, Hkv, 2G, D]: token t of the buffered range
  [n_quant, length) lives in slot t % 2G (n_quant is a multiple of G, so the range never
  wraps onto itself and quantizing the oldest G frees one contiguous half).

Policy: an append that would hold more than 2G buffered tokens first quantizes the oldest
whole groups of G, just enough to fit: n_quant(len) = G * max(0, ceil((len - 2G) / G)),
never decreasing. After any step the buffer holds min(len, G+1 .. 2G) tokens, so rollback of
up to G tokens after a step of <= G+1 tokens always stays in full precision; rollback never
drops quantized tokens (ValueError). Note that quantization is decided at append time: a
step that crossed a G boundary and is then rolled back keeps its newly quantized (accepted)
group, which decoding the accepted tokens alone would have quantized one step later.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.cache.base import KVCacheBase


def quantized_length(length: int, group_size: int, n_quant: int = 0) -> int:
    """Quantized prefix after the cache reaches `length` tokens (lazy, whole groups)."""
    need = group_size * max(0, math.ceil((length - 2 * group_size) / group_size))
    return max(n_quant, need)


class HierarchicalKVCache(KVCacheBase):
    format = "hierarchical"
    precisions = (8, 4)

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 group_size: int = 128):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, max_length, dtype, device)
        g = group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for nibble packing, got {head_dim}")
        self.group_size = g
        self.value_group = min(g, head_dim)
        if head_dim % self.value_group or self.value_group % 2:
            raise ValueError(f"head_dim {head_dim} must be a multiple of the value group "
                             f"{self.value_group} (min(group_size, head_dim)), itself even")
        self.ring = 2 * g
        ng = max(1, math.ceil(max_length / g))
        self.quant_capacity = tq = ng * g
        lb = (num_layers, batch_size, num_kv_heads)
        dev = self.device
        u8 = torch.uint8
        self.k_u = torch.zeros(*lb, tq, head_dim // 2, dtype=u8, device=dev)
        self.k_l = torch.zeros_like(self.k_u)
        self.v_u = torch.zeros_like(self.k_u)
        self.v_l = torch.zeros_like(self.k_u)
        self.k_min = torch.zeros(*lb, ng, head_dim, dtype=dtype, device=dev)
        self.k_scale = torch.zeros_like(self.k_min)
        self.v_min = torch.zeros(*lb, tq, head_dim // self.value_group, dtype=dtype, device=dev)
        self.v_scale = torch.zeros_like(self.v_min)
        self.k_buf = torch.zeros(*lb, self.ring, head_dim, dtype=dtype, device=dev)
        self.v_buf = torch.zeros_like(self.k_buf)
        self._nq = [0] * batch_size
        self._nq_start = [0] * batch_size
        self.n_quant = torch.zeros(batch_size, dtype=torch.int32, device=dev)

    # ------------------------------------------------------------------ bookkeeping
    def _on_lengths_changed(self) -> None:
        self._nq_start = list(self._nq)
        self._nq = [quantized_length(n, self.group_size, q) for n, q in zip(self._len, self._nq)]

    def _sync(self) -> None:
        super()._sync()
        self.n_quant.copy_(torch.tensor(self._nq, dtype=torch.int32))

    def _check_rollback(self, b: int, k: int) -> None:
        if self._len[b] - k < self._nq[b]:
            raise ValueError(f"rollback: sequence {b} has {self._len[b] - self._nq[b]} "
                             f"full-precision tokens; dropping {k} would drop quantized ones")

    def quantized_lengths(self) -> list[int]:
        return list(self._nq)

    # ------------------------------------------------------------------ writes
    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v: [B, Hkv, S, D] (model dtype); sequence b stores its first counts[b]
        positions, quantizing the groups the step pushed out of the buffer."""
        from qwen3_fast import ops

        self._check_write(layer, k, v)
        k = k.to(self.dtype)
        v = v.to(self.dtype)
        g, ring = self.group_size, self.ring
        flush = [q1 > q0 for q0, q1 in zip(self._nq_start, self._nq)]
        if not any(flush) and all(c == 1 for c in self._count):  # the decode step
            slots = torch.tensor([s % ring for s in self._start], device=self.device)
            rows = torch.arange(self.batch_size, device=self.device)
            self.k_buf[layer, rows, :, slots] = k[:, :, 0]
            self.v_buf[layer, rows, :, slots] = v[:, :, 0]
            return
        for b in range(self.batch_size):
            start, cnt = self._start[b], self._count[b]
            q0, q1, end = self._nq_start[b], self._nq[b], start + cnt
            if q1 > q0:  # quantize tokens [q0, q1): old buffer tokens, then new ones
                old = torch.arange(q0, min(start, q1), device=self.device) % ring
                parts_k = [self.k_buf[layer, b][:, old]]
                parts_v = [self.v_buf[layer, b][:, old]]
                if q1 > start:
                    parts_k.append(k[b, :, :q1 - start])
                    parts_v.append(v[b, :, :q1 - start])
                fk = torch.cat(parts_k, dim=1)  # [Hkv, q1 - q0, D]
                fv = torch.cat(parts_v, dim=1)
                ku, kl, kmn, ks = ops.kv_quantize(fk, "key", g)
                vu, vl, vmn, vs = ops.kv_quantize(fv, "value", self.value_group)
                self.k_u[layer, b, :, q0:q1] = ku
                self.k_l[layer, b, :, q0:q1] = kl
                self.k_min[layer, b, :, q0 // g:q1 // g] = kmn
                self.k_scale[layer, b, :, q0 // g:q1 // g] = ks
                self.v_u[layer, b, :, q0:q1] = vu
                self.v_l[layer, b, :, q0:q1] = vl
                self.v_min[layer, b, :, q0:q1] = vmn
                self.v_scale[layer, b, :, q0:q1] = vs
            first = max(start, q1)
            if end > first:
                slots = torch.arange(first, end, device=self.device) % ring
                self.k_buf[layer, b][:, slots] = k[b, :, first - start:cnt]
                self.v_buf[layer, b][:, slots] = v[b, :, first - start:cnt]

    # ------------------------------------------------------------------ reads
    def dequantized(self, layer: int, bits: int = 8) -> tuple[Tensor, Tensor]:
        """(k, v) [B, Hkv, T, D] float32 in logical order, quantized part dequantized at
        `bits` (8 or 4): what the kernels must compute attention over (the reference view)."""
        from qwen3_fast.ops import reference

        t = max(self._len) if self._len else 0
        shape = (self.batch_size, self.num_kv_heads, t, self.head_dim)
        kd = torch.zeros(shape, dtype=torch.float32, device=self.device)
        vd = torch.zeros_like(kd)
        g = self.group_size
        for b in range(self.batch_size):
            nq, n = self._nq[b], self._len[b]
            if nq:
                kd[b, :, :nq] = reference.kv_dequantize(
                    self.k_u[layer, b, :, :nq], self.k_l[layer, b, :, :nq],
                    self.k_min[layer, b, :, :nq // g], self.k_scale[layer, b, :, :nq // g],
                    "key", g, bits)
                vd[b, :, :nq] = reference.kv_dequantize(
                    self.v_u[layer, b, :, :nq], self.v_l[layer, b, :, :nq],
                    self.v_min[layer, b, :, :nq], self.v_scale[layer, b, :, :nq],
                    "value", self.value_group, bits)
            if n > nq:
                slots = torch.arange(nq, n, device=self.device) % self.ring
                kd[b, :, nq:n] = self.k_buf[layer, b][:, slots].float()
                vd[b, :, nq:n] = self.v_buf[layer, b][:, slots].float()
        return kd, vd

    # ------------------------------------------------------------------ sizes
    def bytes_per_token(self, bits: Optional[int] = 8) -> float:
        """Bytes per token per layer of the quantized store: stored (bits=8: U + L + scales)
        or read by the draft (bits=4: U + scales). The 2G-token buffer is a fixed extra."""
        d, hkv, g = self.head_dim, self.num_kv_heads, self.group_size
        e = self.k_min.element_size()
        codes = d // 2 * (2 if bits == 8 else 1)  # bytes of codes per token per head, k or v
        k_meta = 2 * d * e / g  # min + scale per channel, shared by G tokens
        v_meta = 2 * (d // self.value_group) * e
        return hkv * (2 * codes + k_meta + v_meta)

    def buffer_bytes(self) -> int:
        """Fixed per-layer bytes of the full-precision buffer (all sequences)."""
        return 2 * self.k_buf[0].numel() * self.k_buf.element_size()

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.k_u, self.k_l, self.v_u, self.v_l, self.k_min, self.k_scale, self.v_min,
            self.v_scale, self.k_buf, self.v_buf))
