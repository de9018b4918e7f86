"""Dense and hierarchical KV caches: exact format, buffer policy, ragged writes, rollback,
bytes per token.

    pytest python_tests/cache     # a few seconds on 2 CPU cores
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.cache import DenseKVCache, HierarchicalKVCache, quantized_length
from qwen3_fast.ops import reference


def _kv(b, hkv, s, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hkv, s, d, generator=g).to(dtype),
            torch.randn(b, hkv, s, d, generator=g).to(dtype))


def _fill(cache, steps, seed=0):
    """Run steps (a list of per-sequence counts) writing random tokens to every layer;
    returns the full history [B, Hkv, T, D] per sequence as lists of [Hkv, n, D]."""
    hist_k = [[] for _ in range(cache.batch_size)]
    hist_v = [[] for _ in range(cache.batch_size)]
    for i, counts in enumerate(steps):
        cache.begin_step(counts)
        s = max(counts) if isinstance(counts, list) else counts
        k, v = _kv(cache.batch_size, cache.num_kv_heads, max(s, 1), cache.head_dim, cache.dtype,
                   seed=seed + i)
        for layer in range(cache.num_layers):
            cache.write(layer, k, v)
        cnt = counts if isinstance(counts, list) else [counts] * cache.batch_size
        for b, c in enumerate(cnt):
            hist_k[b].append(k[b, :, :c])
            hist_v[b].append(v[b, :, :c])
    return ([torch.cat(h, 1) for h in hist_k], [torch.cat(h, 1) for h in hist_v])


def test_quantized_length_policy():
    g = 128
    assert [quantized_length(n, g) for n in (0, 1, g, 2 * g)] == [0, 0, 0, 0]
    assert quantized_length(2 * g + 1, g) == g
    assert quantized_length(3 * g, g) == g
    assert quantized_length(3 * g + 1, g) == 2 * g
    assert quantized_length(10, g, n_quant=g) == g  # never decreases


def test_dense_write_ragged_and_rollback():
    c = DenseKVCache(2, 3, 2, 8, 50, torch.float32)
    hk, hv = _fill(c, [[3, 0, 5], 1, 1])
    assert c.seq_lengths() == [5, 2, 7] and c.lengths.tolist() == [5, 2, 7]
    for layer in range(2):
        for b in range(3):
            n = c.seq_lengths()[b]
            assert torch.equal(c.k[layer, b, :, :n], hk[b]) and torch.equal(c.v[layer, b, :, :n], hv[b])
    c.rollback([1, 0, 2])
    assert c.seq_lengths() == [4, 2, 5]
    with pytest.raises(ValueError, match="cannot drop"):
        c.rollback([5, 0, 0])
    with pytest.raises(ValueError, match="max_length"):
        c.begin_step(50)
    assert c.bytes_per_token() == 2 * 2 * 8 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g,d", [(128, 128), (16, 64), (8, 8)])
def test_hierarchical_exact_format(dtype, g, d):
    lengths = [1, g - 1, g, 2 * g + 1, 5 * g + 3]
    c = HierarchicalKVCache(2, len(lengths), 2, d, 6 * g + 40, dtype, group_size=g)
    steps = [lengths] + [1] * (g + 3) + [[3, 0, 2, 1, 4]]
    hk, hv = _fill(c, steps)
    gv = min(g, d)
    for layer in range(2):
        for b, n in enumerate(c.seq_lengths()):
            nq = c.quantized_lengths()[b]
            assert nq == quantized_length(n, g) or nq > quantized_length(n, g) - g
            assert nq % g == 0 and 0 <= n - nq <= 2 * g
            if nq:  # the stored quantized part is kv_quantize of exactly those tokens
                ku, kl, kmn, ks = reference.kv_quantize(hk[b][:, :nq], "key", g)
                vu, vl, vmn, vs = reference.kv_quantize(hv[b][:, :nq], "value", gv)
                assert torch.equal(c.k_u[layer, b, :, :nq], ku)
                assert torch.equal(c.k_l[layer, b, :, :nq], kl)
                assert torch.equal(c.k_min[layer, b, :, :nq // g], kmn)
                assert torch.equal(c.k_scale[layer, b, :, :nq // g], ks)
                assert torch.equal(c.v_u[layer, b, :, :nq], vu)
                assert torch.equal(c.v_l[layer, b, :, :nq], vl)
                assert torch.equal(c.v_min[layer, b, :, :nq], vmn)
                assert torch.equal(c.v_scale[layer, b, :, :nq], vs)
            slots = torch.arange(nq, n) % (2 * g)  # the rest in the ring buffer, bit exact
            assert torch.equal(c.k_buf[layer, b][:, slots], hk[b][:, nq:n])
            assert torch.equal(c.v_buf[layer, b][:, slots], hv[b][:, nq:n])
            kd, vd = c.dequantized(layer, 8)
            assert torch.equal(kd[b, :, nq:n], hk[b][:, nq:n].float())


def test_rollback_only_full_precision_and_exact():
    g = 16
    a = HierarchicalKVCache(1, 2, 2, 32, 400, torch.bfloat16, group_size=g)
    b = HierarchicalKVCache(1, 2, 2, 32, 400, torch.bfloat16, group_size=g)
    # identical histories, then a has 5 rejected draft tokens appended and rolled back
    _fill(a, [[40, 70]] + [1] * 3, seed=0)
    _fill(b, [[40, 70]] + [1] * 3, seed=0)
    a.begin_step(5)
    k, v = _kv(2, 2, 5, 32, seed=99)
    a.write(0, k, v)
    assert a.quantized_lengths() == b.quantized_lengths()
    a.rollback(5)
    assert a.seq_lengths() == b.seq_lengths()
    _fill(a, [1, 2], seed=7)  # continue both the same way
    _fill(b, [1, 2], seed=7)
    for name in ("k_u", "k_l", "k_min", "k_scale", "v_u", "v_l", "v_min", "v_scale"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert torch.equal(ta, tb), name
    for bi, (n, nq) in enumerate(zip(a.seq_lengths(), a.quantized_lengths())):
        slots = torch.arange(nq, n) % (2 * g)
        assert torch.equal(a.k_buf[0, bi][:, slots], b.k_buf[0, bi][:, slots])
    q = torch.randn(2, 4, 1, 32).to(torch.bfloat16)
    for p in (8, 4):
        assert torch.equal(ops.flash_decode(q, a, 0, p), ops.flash_decode(q, b, 0, p))
    # dropping into the quantized part is refused and changes nothing
    n, nq = a.seq_lengths(), a.quantized_lengths()
    with pytest.raises(ValueError, match="quantized"):
        a.rollback([n[0] - nq[0] + 1, 0])
    assert a.seq_lengths() == n
    a.rollback([n[0] - nq[0], 0])  # all of the buffer is fine
    assert a.seq_lengths()[0] == nq[0]


def test_bytes_per_token_qwen3_shapes():
    c = HierarchicalKVCache(1, 1, 8, 128, 256, torch.bfloat16, group_size=128)
    d = DenseKVCache(1, 1, 8, 128, 256, torch.bfloat16)
    assert d.bytes_per_token() == 4096
    assert c.bytes_per_token(8) == 8 * (2 * 128 + 4 + 4) == 2112  # 0.516 x bf16
    assert c.bytes_per_token(4) == 8 * (2 * 64 + 4 + 4) == 1088  # draft reads 0.266 x
    assert c.bytes_per_token(8) / d.bytes_per_token() <= 0.56


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="group_size"):
        HierarchicalKVCache(1, 1, 1, 8, 10, group_size=3)
    with pytest.raises(ValueError, match="head_dim"):
        HierarchicalKVCache(1, 1, 1, 7, 10, group_size=2)
    with pytest.raises(TypeError, match="dtype"):
        DenseKVCache(1, 1, 1, 8, 10, torch.int32)
    with pytest.raises(ValueError, match="batch_size"):
        DenseKVCache(1, 0, 1, 8, 10)
    c = HierarchicalKVCache(2, 2, 1, 8, 10, group_size=4)
    with pytest.raises(ValueError, match="counts"):
        c.begin_step([1])
    c.begin_step(2)
    with pytest.raises(ValueError, match="layer"):
        c.write(2, *_kv(2, 1, 2, 8))
    with pytest.raises(ValueError, match="k has shape"):
        c.write(0, *_kv(2, 2, 2, 8))
    with pytest.raises(ValueError, match="reserved"):
        c.write(0, *_kv(2, 1, 1, 8))
