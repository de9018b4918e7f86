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
    assert quantized_length(10, g, n_quant=g) == g  # a lower bound is respected


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
            assert nq == quantized_length(n, g)  # a pure function of the length
            assert nq % g == 0 and 0 <= n - nq <= 2 * g
            if nq:  # the stored quantized part is kv_quantize of exactly those tokens
                ku, kl, kmn, ks = reference.kv_quantize(hk[b][:, :nq], "key", g)
                vu, vl, vmn, vs = reference.kv_quantize(hv[b][:, :nq], "value", gv)
                assert torch.equal(c.k_u[layer, b, :, :nq // g], ku)
                assert torch.equal(c.k_l[layer, b, :, :nq // g], kl)
                assert torch.equal(c.k_min[layer, b, :, :nq // g], kmn)
                assert torch.equal(c.k_scale[layer, b, :, :nq // g], ks)
                assert torch.equal(c.v_u[layer, b, :, :nq], vu)
                assert torch.equal(c.v_l[layer, b, :, :nq], vl)
                assert torch.equal(c.v_min[layer, b, :, :nq], vmn)
                assert torch.equal(c.v_scale[layer, b, :, :nq], vs)
            slots = torch.arange(nq, n) % c.ring  # the rest in the ring buffer, bit exact
            assert torch.equal(c.k_buf[layer, b][:, slots], hk[b][:, nq:n])
            assert torch.equal(c.v_buf[layer, b][:, slots], hv[b][:, nq:n])
            kd, vd = c.dequantized(layer, 8)
            assert torch.equal(kd[b, :, nq:n], hk[b][:, nq:n].float())


def _assert_same_live_state(a, b, where=""):
    sa, sb = a.live_state(), b.live_state()
    assert sa.keys() == sb.keys()
    for name in sa:
        if name in ("length", "n_quant"):
            assert sa[name] == sb[name], f"{where}: {name} {sa[name]} != {sb[name]}"
            continue
        for i, (x, y) in enumerate(zip(sa[name], sb[name])):
            assert x.shape == y.shape and torch.equal(x, y), f"{where}: {name}[{i}] differs"


def _append(cache, per_seq, rng_seed):
    """One step: sequence b appends the tokens per_seq[b] ([Hkv, c_b, D] pairs) to every layer."""
    counts = [k.shape[1] for k, _ in per_seq]
    cache.begin_step(counts)
    s = max(max(counts), 1)
    k = torch.zeros(cache.batch_size, cache.num_kv_heads, s, cache.head_dim, dtype=cache.dtype)
    v = torch.zeros_like(k)
    for b, (kb, vb) in enumerate(per_seq):
        k[b, :, :kb.shape[1]] = kb
        v[b, :, :vb.shape[1]] = vb
    for layer in range(cache.num_layers):
        # layers differ (a scaled copy) so a layer mix-up would show
        cache.write(layer, k * (layer + 1), v * (layer + 1))


@pytest.mark.parametrize("g,d,gamma", [(8, 16, 4), (16, 32, 6)])
def test_speculative_rollback_equals_plain_decoding(g, d, gamma):
    """Random verification-style steps (1..gamma+1 tokens per sequence, mixed) and
    draft-style runs of single steps, each followed by random per-sequence rollbacks, over
    many group boundaries: after every rollback the cache's live state (codes, scales,
    buffer, lengths) equals that of a cache fed only the accepted tokens one at a time."""
    batch, hkv, layers = 3, 2, 2
    gen = torch.Generator().manual_seed(g * 100 + gamma)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    tok = lambda n: (torch.randn(hkv, n, d, generator=gen).to(torch.bfloat16),  # noqa: E731
                     torch.randn(hkv, n, d, generator=gen).to(torch.bfloat16))
    cap = 12 * g
    spec = HierarchicalKVCache(layers, batch, hkv, d, cap, torch.bfloat16, group_size=g,
                               max_speculative_tokens=gamma)
    plain = HierarchicalKVCache(layers, batch, hkv, d, cap, torch.bfloat16, group_size=g,
                                max_speculative_tokens=gamma)
    accepted = [[] for _ in range(batch)]  # list of (k, v) [Hkv, 1, D] per sequence
    fed = [0] * batch  # tokens of `accepted` already fed to `plain`

    def feed_plain():
        while any(f < len(a) for f, a in zip(fed, accepted)):
            per = []
            for b in range(batch):
                if fed[b] < len(accepted[b]):
                    per.append(accepted[b][fed[b]])
                    fed[b] += 1
                else:
                    per.append((torch.zeros(hkv, 0, d), torch.zeros(hkv, 0, d)))
            _append(plain, per, 0)

    # ragged prefill, some longer than the ring (groups quantized straight from the step)
    pre = [rint(1, 2 * g + gamma + 3), rint(2 * g, 3 * g + 5), rint(1, g)]
    per = [tok(n) for n in pre]
    _append(spec, per, 0)
    for b, (kb, vb) in enumerate(per):
        accepted[b] += [(kb[:, i:i + 1], vb[:, i:i + 1]) for i in range(kb.shape[1])]
    rounds = 0
    while min(spec.seq_lengths()) < 6 * g:
        rounds += 1
        steps = [[tok(rint(1, gamma + 1)) for _ in range(batch)]] if rounds % 3 else \
            [[tok(1) for _ in range(batch)] for _ in range(rint(1, gamma))]  # draft-like
        new = [[] for _ in range(batch)]
        for per in steps:
            _append(spec, per, rounds)
            for b, (kb, vb) in enumerate(per):
                new[b] += [(kb[:, i:i + 1], vb[:, i:i + 1]) for i in range(kb.shape[1])]
        drop = [rint(0, min(len(new[b]) - 1, gamma)) if rounds % 4 else
                min(len(new[b]), gamma) for b in range(batch)]  # sometimes all of a draft
        spec.rollback(drop)
        for b in range(batch):
            accepted[b] += new[b][:len(new[b]) - drop[b]]
        feed_plain()
        _assert_same_live_state(spec, plain, f"round {rounds}")
    assert rounds > 12
    q = torch.randn(batch, 2 * hkv, 1, d, generator=gen).to(torch.bfloat16)
    for p in (8, 4):
        for layer in range(layers):
            assert torch.equal(ops.flash_decode(q, spec, layer, p),
                               ops.flash_decode(q, plain, layer, p))


def test_rollback_floor_and_unquantize_after_long_prefill():
    g, s = 8, 4
    a = HierarchicalKVCache(1, 2, 1, 8, 200, torch.float32, group_size=g, max_speculative_tokens=s)
    b = HierarchicalKVCache(1, 2, 1, 8, 200, torch.float32, group_size=g, max_speculative_tokens=s)
    hk, hv = _kv(2, 1, 25, 8, torch.float32, seed=3)
    a.begin_step(25)  # n_quant(25) = 16: group [8, 16) quantized straight from this step
    a.write(0, hk, hv)
    assert a.quantized_lengths() == [16, 16] and a.rollback_floor() == [21, 21]
    a.rollback([1, 4])  # back to 24 (n_quant 8: [8, 16) back in full precision) and 21
    assert a.quantized_lengths() == [8, 8]
    for n in range(24):
        b.begin_step([1, 1 if n < 21 else 0])
        b.write(0, hk[:, :, n:n + 1], hv[:, :, n:n + 1])
    _assert_same_live_state(a, b)
    n, nq = a.seq_lengths(), a.quantized_lengths()
    with pytest.raises(ValueError, match="max_speculative_tokens"):
        a.rollback([4, 0])  # 24 - 4 = 20 < 25 - 4
    assert a.seq_lengths() == n and a.quantized_lengths() == nq
    a.reset()
    assert a.rollback_floor() == [0, 0]
    with pytest.raises(ValueError, match="max_speculative_tokens must be"):
        HierarchicalKVCache(1, 1, 1, 8, 10, group_size=4, max_speculative_tokens=-1)


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
