"""KV caches: preallocated per-layer storage that the model writes and flash-decoding reads.

- :class:`DenseKVCache`: ``[B, Hkv, T, D]`` per layer in the model dtype.
- :class:`HierarchicalKVCache`: QuantSpec's hierarchical format (DESIGN.md "KV caches"):
  8-bit codes stored as upper/lower 4-bit halves, plus a full-precision ring buffer of
  2G + max_speculative_tokens slots per sequence.

Both keep per-sequence lengths (ragged batches) and follow one step protocol, driven by the
model's forward: ``begin_step(counts)`` reserves ``counts[b]`` new tokens per sequence,
every layer calls ``write(layer, k, v)``, attention reads the cache (lengths already
include the new tokens), and ``rollback(n)`` drops rejected tokens afterwards. After any
step or rollback the state is a function of the accepted tokens alone: ``live_state()``
of a cache that drafted and rolled back equals that of one fed only the accepted tokens
(the hierarchical cache's quantized prefix depends on the length only; see its module).
"""
from qwen3_fast.cache.dense import DenseKVCache
from qwen3_fast.cache.hierarchical import HierarchicalKVCache, quantized_length

__all__ = ["DenseKVCache", "HierarchicalKVCache", "quantized_length"]
