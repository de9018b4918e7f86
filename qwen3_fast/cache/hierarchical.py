"""Hierarchical (QuantSpec) KV cache: one store, read as 8-bit (target) or 4-bit (draft).

Format (DESIGN.md "KV caches", csrc/include/qwen3_fast/kv_quant_math.h): per group,
s = (max - min) / 15 and the exact 8-bit code c = round((x - min) / (s/16)) in [0, 240],
stored as U = (c + 8) >> 4 and L = c - 16U + 8 in separate nibble-packed arrays.
8-bit value c * s/16 + min (|err| <= s/32), 4-bit value U * s + min (|err| <= 17/32 s).

Per layer (leading dim of every tensor):
- keys, per channel over groups of G tokens: k_u, k_l [B, Hkv, Tq/G, D, G/2] uint8, channel-
  major inside a group with the nibbles packed along tokens (token 2j low, 2j+1 high), so
  a query channel meets a run of G tokens' codes contiguously (scores vectorize over
  tokens); k_min, k_scale [B, Hkv, Tq/G, D] model dtype;
- values, per token over groups of Gv = min(G, D) along head_dim (QuantSpec: G = D = 128,
  one group per token): v_u, v_l [B, Hkv, Tq, D/2], v_min, v_scale [B, Hkv, Tq, D/Gv];
- full-precision ring buffer k_buf, v_buf [B, Hkv, 2G + S, D], S = max_speculative_tokens:
  token t of the buffered range [n_quant, length) lives in slot t % (2G + S).

Policy: the quantized prefix is a pure function of the length,
n_quant(len) = G * max(0, ceil((len - 2G) / G)) (whole groups; the buffer then holds
min(len, G+1 .. 2G) tokens), so after any step or rollback the cache holds exactly what
one-token-at-a-time decoding of the same (accepted) tokens would have built: the same codes
and scales for [0, n_quant) and the same full-precision values for [n_quant, len) at the same
slots (:meth:`live_state`). A step that pushes a group out of the buffer quantizes it at
once (every new token is also written to the ring); a rollback that brings the length
back below the boundary simply lowers n_quant: the group's full-precision values are still
in the ring. ``rollback`` may return a sequence to any length L >= peak - S, where peak is
the longest length it has reached since :meth:`reset` (ValueError below that): the tokens
[n_quant(L), L) it needs span at most 2G, and a token t's slot is only reused by token
t + 2G + S >= n_quant(L) + 2G + S >= L + S >= peak, which was never written. Self-speculative
decoding needs S >= gamma (gamma drafted tokens, verification of gamma + 1, rollback of
the rejected ones). The codes beyond n_quant left by such a rollback are stale and never
read; the next crossing re-quantizes the same accepted tokens to the same codes.

Verify reads (flash_decode with n > 1 new tokens, lengths L0 -> L = L0 + n): query row i
at p = L0 + i reads codes for [0, nq_i) and the ring for [nq_i, p], nq_i =
n_quant(p + 1), exactly what one-token decoding of p read (ops.reference.kv_row_quant_lengths).
Codes exist up to n_quant(L) >= nq_i. The ring holds every token >= nq_0 when n <= S + 1:
nq_0 >= L0 + 1 - 2G, and a token t >= nq_0 shares its slot only with t + 2G + S >=
L0 + 1 + S >= L, not written in this step (n <= S + 1), nor before it (the peak before the
step is <= L0 + S by the rollback floor). A longer step (a chunked prefill) overwrites
older slots: the kernels then raise nq_i to the ring's oldest whole group, at most n_quant(L).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.cache.base import KVCacheBase


def quantized_length(length: int, group_size: int, n_quant: int = 0) -> int:
    """Quantized prefix of a sequence of `length` tokens (whole groups, at most 2G left in
    full precision); `n_quant` is a lower bound (kept for callers that track one)."""
    need = group_size * max(0, math.ceil((length - 2 * group_size) / group_size))
    return max(n_quant, need)


class HierarchicalKVCache(KVCacheBase):
    format = "hierarchical"
    precisions = (8, 4)

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 group_size: int = 128, max_speculative_tokens: int = 16):
        """max_speculative_tokens (S): how far below its longest length a sequence may be
        rolled back (>= gamma for self-speculative decoding); costs S buffer slots."""
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, max_length, dtype, device)
        g = group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
        s = max_speculative_tokens
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"max_speculative_tokens must be an int >= 0, got {s!r}")
        self.max_speculative_tokens = s
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for nibble packing, got {head_dim}")
        self.group_size = g
        self.value_group = min(g, head_dim)
        if head_dim % self.value_group or self.value_group % 2:
            raise ValueError(f"head_dim {head_dim} must be a multiple of the value group "
                             f"{self.value_group} (min(group_size, head_dim)), itself even")
        self.ring = 2 * g + s
        ng = max(1, math.ceil(max_length / g))
        self.quant_capacity = tq = ng * g
        lb = (num_layers, batch_size, num_kv_heads)
        dev = self.device
        u8 = torch.uint8
        self.k_u = torch.zeros(*lb, ng, head_dim, g // 2, dtype=u8, device=dev)
        self.k_l = torch.zeros_like(self.k_u)
        self.v_u = torch.zeros(*lb, tq, head_dim // 2, dtype=u8, device=dev)
        self.v_l = torch.zeros_like(self.v_u)
        self.k_min = torch.zeros(*lb, ng, head_dim, dtype=dtype, device=dev)
        self.k_scale = torch.zeros_like(self.k_min)
        self.v_min = torch.zeros(*lb, tq, head_dim // self.value_group, dtype=dtype, device=dev)
        self.v_scale = torch.zeros_like(self.v_min)
        self.k_buf = torch.zeros(*lb, self.ring, head_dim, dtype=dtype, device=dev)
        self.v_buf = torch.zeros_like(self.k_buf)
        self._nq = [0] * batch_size
        self._nq_start = [0] * batch_size
        self._peak = [0] * batch_size  # longest length since reset: rollback floor + S
        self.n_quant = torch.zeros(batch_size, dtype=torch.int32, device=dev)

    # ------------------------------------------------------------------ bookkeeping
    def _on_lengths_changed(self) -> None:
        self._nq_start = list(self._nq)
        self._nq = [quantized_length(n, self.group_size) for n in self._len]
        self._peak = [max(p, n) for p, n in zip(self._peak, self._len)]

    def _on_rollback(self) -> None:
        # n_quant is a function of the length: lowering it "un-quantizes" groups whose
        # full-precision values are still in the ring (module docstring).
        self._nq = [quantized_length(n, self.group_size) for n in self._len]
        self._nq_start = [min(a, b) for a, b in zip(self._nq_start, self._nq)]

    def reset(self) -> None:
        self._peak = [0] * self.batch_size
        super().reset()

    def _sync(self) -> None:
        super()._sync()
        self.n_quant.copy_(torch.tensor(self._nq, dtype=torch.int32))

    def _check_rollback(self, b: int, k: int) -> None:
        floor = self._peak[b] - self.max_speculative_tokens
        if self._len[b] - k < floor:
            raise ValueError(
                f"rollback: sequence {b} can go back to length {max(floor, 0)} at the least "
                f"(its longest length {self._peak[b]} minus max_speculative_tokens "
                f"{self.max_speculative_tokens}); dropping {k} of {self._len[b]} tokens goes "
                f"below")

    def rollback_floor(self) -> list[int]:
        """Per sequence, the shortest length :meth:`rollback` may return to."""
        return [max(0, p - self.max_speculative_tokens) for p in self._peak]

    def quantized_lengths(self) -> list[int]:
        return list(self._nq)

    def step_quantizes(self, n: int = 1) -> bool:
        """Whether a step adding `n` tokens to every sequence would push a group out of the
        ring (that step quantizes it in :meth:`write`; the others only write ring slots)."""
        g = self.group_size
        return any(quantized_length(length + n, g) > q for length, q in zip(self._len, self._nq))

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
                self.k_u[layer, b, :, q0 // g:q1 // g] = ku
                self.k_l[layer, b, :, q0 // g:q1 // g] = kl
                self.k_min[layer, b, :, q0 // g:q1 // g] = kmn
                self.k_scale[layer, b, :, q0 // g:q1 // g] = ks
                self.v_u[layer, b, :, q0:q1] = vu
                self.v_l[layer, b, :, q0:q1] = vl
                self.v_min[layer, b, :, q0:q1] = vmn
                self.v_scale[layer, b, :, q0:q1] = vs
            # every new token goes to the ring, also those quantized already (up to the
            # newest `ring`): a rollback may un-quantize them again
            first = max(start, end - ring)
            if end > first:
                slots = torch.arange(first, end, device=self.device) % ring
                self.k_buf[layer, b][:, slots] = k[b, :, first - start:cnt]
                self.v_buf[layer, b][:, slots] = v[b, :, first - start:cnt]

    # ------------------------------------------------------------------ reads
    def dequantized(self, layer: int, bits: int = 8,
                    lengths: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
        """(k, v) [B, Hkv, T, D] float32 in logical order, quantized part dequantized at
        `bits` (8 or 4): what the kernels must compute attention over (the reference view).
        `lengths` (per sequence, between :meth:`rollback_floor` and the current length): the
        view the sequence would read at that length instead (n_quant of that length, the
        rest from the ring; T = max(lengths)): what row i of a verify step must read."""
        from qwen3_fast.ops import reference

        if lengths is None:
            lengths = self._len
        if len(lengths) != self.batch_size or any(
                not lo <= n <= cur for lo, n, cur in zip(self.rollback_floor(), lengths, self._len)):
            raise ValueError(f"lengths must give each sequence a length between its rollback "
                             f"floor {self.rollback_floor()} and its length {self._len}, got "
                             f"{lengths}")
        t = max(lengths) if lengths else 0
        shape = (self.batch_size, self.num_kv_heads, t, self.head_dim)
        kd = torch.zeros(shape, dtype=torch.float32, device=self.device)
        vd = torch.zeros_like(kd)
        g = self.group_size
        for b in range(self.batch_size):
            n = lengths[b]
            nq = quantized_length(n, g)
            if nq:
                kd[b, :, :nq] = reference.kv_dequantize(
                    self.k_u[layer, b, :, :nq // g], self.k_l[layer, b, :, :nq // g],
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

    def live_state(self) -> dict:
        """Everything a reader of the cache can see, per sequence (all layers): "length",
        "n_quant" (lists of ints) and, as lists over the batch, the quantized part
        k_u, k_l, k_min, k_scale [L, Hkv, nq/G, ...], v_u, v_l
        [L, Hkv, nq, D/2], v_min, v_scale [L, Hkv, nq, D/Gv], and the buffered tokens
        k_buf, v_buf [L, Hkv, len - nq, D] in token order (k_u, k_l are
        [L, Hkv, nq/G, D, G/2]: the cache's key layout). Two caches that decoded the same
        accepted tokens have equal live states, whatever was drafted and rolled back."""
        g = self.group_size
        out: dict = {"length": list(self._len), "n_quant": list(self._nq)}
        for name in ("k_u", "k_l", "k_min", "k_scale", "v_u", "v_l", "v_min", "v_scale",
                     "k_buf", "v_buf"):
            out[name] = []
        for b, (n, nq) in enumerate(zip(self._len, self._nq)):
            for name in ("v_u", "v_l", "v_min", "v_scale"):
                out[name].append(getattr(self, name)[:, b, :, :nq].clone())
            for name in ("k_u", "k_l", "k_min", "k_scale"):
                out[name].append(getattr(self, name)[:, b, :, :nq // g].clone())
            slots = torch.arange(nq, n, device=self.device) % self.ring
            out["k_buf"].append(self.k_buf[:, b][:, :, slots].clone())
            out["v_buf"].append(self.v_buf[:, b][:, :, slots].clone())
        return out

    # ------------------------------------------------------------------ sizes
    def bytes_per_token(self, bits: Optional[int] = 8) -> float:
        """Bytes per token per layer of the quantized store: stored (bits=8: U + L + scales)
        or read by the draft (bits=4: U + scales). The (2G + S)-slot buffer is a fixed extra."""
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
