"""flash_decode over dense (16) and hierarchical (8, 4) caches against the reference
(attention in fp32 over the dequantized cache), close to full-precision attention, ragged
batches, the verify variant (n > 1, causal among the new tokens; over the hierarchical
cache row i reads the quantized prefix of its own length, as one-token decoding did), bad
inputs.

Lengths 1, G-1, G, 2G+1, 4096+17 and 32768 (about 2 s on the C++ kernel: not marked slow).

    pytest python_tests/ops/test_flash_decode.py     # ~30 s on 2 CPU cores
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.cache import DenseKVCache, HierarchicalKVCache, quantized_length
from qwen3_fast.ops import reference

from conftest import compiled_backends

G = 128
LENGTHS = [1, G - 1, G, 2 * G + 1, 4096 + 17]


def make_caches(lengths, hkv=2, d=128, g=G, dtype=torch.bfloat16, device="cpu", seed=0,
                decode_steps=0):
    """Dense and hierarchical caches holding the same random keys/values: one prefill step
    of `lengths` tokens, then `decode_steps` single-token steps. Returns (dense, hier, k, v)
    with k, v [B, Hkv, T, D] the full-precision history."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    total = max(lengths) + decode_steps
    k = torch.randn(b, hkv, total, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, total, d, generator=gen).to(dtype)
    k[..., 5] += 3.0  # an outlier channel, as real keys have
    dense = DenseKVCache(1, b, hkv, d, total, dtype, device)
    hier = HierarchicalKVCache(1, b, hkv, d, total, dtype, device, group_size=g)
    for c in (dense, hier):
        c.begin_step(lengths)
        c.write(0, k[:, :, :max(lengths)].to(device), v[:, :, :max(lengths)].to(device))
    kk = torch.zeros_like(k)
    vv = torch.zeros_like(v)
    for i, n in enumerate(lengths):
        kk[i, :, :n], vv[i, :, :n] = k[i, :, :n], v[i, :, :n]
    for step in range(decode_steps):
        for c in (dense, hier):
            c.begin_step(1)
        nk, nv = k[:, :, total - decode_steps + step:][:, :, :1], v[:, :, total - decode_steps + step:][:, :, :1]
        for c in (dense, hier):
            c.write(0, nk.to(device), nv.to(device))
        for i, n in enumerate(lengths):
            kk[i, :, n + step], vv[i, :, n + step] = nk[i, :, 0], nv[i, :, 0]
    return dense, hier, kk, vv


def per_row_reference(q, cache, prec, scale):
    """The oracle, [B, Hq, n, D] float32: query row i of sequence b (position
    p = len_b - n + i) attends over the cache's view at length p + 1 (cache.dequantized with
    lengths: that length's quantized prefix, the rest from the ring), row by row."""
    n = q.shape[2]
    lens = cache.seq_lengths()
    rows = []
    for i in range(n):
        at = [length - n + 1 + i for length in lens]
        kd, vd = cache.dequantized(0, prec, at) if prec != 16 else cache.dequantized(0, prec)
        at_t = torch.tensor(at, dtype=torch.int32, device=q.device)
        rows.append(reference.flash_decode(q[:, :, i:i + 1].float(), kd[:, :, :max(at)].float(),
                                           vd[:, :, :max(at)].float(), at_t, scale))
    return torch.cat(rows, dim=2)


def _check(backend, q, dense, hier, kf, vf, full_tol=(0.0, 0.01, 0.1)):
    scale = q.shape[-1] ** -0.5
    lengths = dense.lengths
    full = reference.flash_decode(q, kf, vf, lengths, scale).float()
    for prec, cache, tol in ((16, dense, full_tol[0]), (8, hier, full_tol[1]), (4, hier, full_tol[2])):
        with ops.use_backend(backend):
            out = ops.flash_decode(q, cache, 0, prec)
        want = per_row_reference(q, cache, prec, scale)
        assert out.dtype == q.dtype and out.shape == q.shape
        err = (out.float() - want).abs().max().item()
        ulp = 2e-6 if q.dtype == torch.float32 else (8e-3 if q.dtype == torch.bfloat16 else 1e-3)
        assert err <= ulp * max(1.0, want.abs().max().item()), f"precision {prec}: {err}"
        # error relative to the values' scale (random data averages to outputs near 0, so
        # the output norm is no yardstick at long context)
        v_rms = vf.float().pow(2).mean().sqrt().item()
        rel = ((out.float() - full).norm() / (full.numel() ** 0.5 * v_rms)).item()
        assert rel <= tol + 4 * ulp, f"precision {prec}: {rel} from full precision"


@pytest.mark.parametrize("device,backend", compiled_backends() + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("length", LENGTHS)
def test_single_sequence(device, backend, length):
    dense, hier, kf, vf = make_caches([length], device=device, seed=length)
    q = torch.randn(1, 8, 1, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    _check(backend, q, dense, hier, kf.to(device), vf.to(device))


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("d", [32, 256, 80])  # the CPU's bf16 fast path: 32..256; 80: generic
@pytest.mark.parametrize("n", [1, 3])
def test_bf16_head_dims(device, backend, d, n):
    lengths = [3, 40, 97]  # a partial block of 32 tokens, several blocks, a tail
    dense, hier, kf, vf = make_caches(lengths, hkv=2, d=d, g=16, device=device, decode_steps=2)
    q = torch.randn(len(lengths), 8, n, d, generator=torch.Generator().manual_seed(5))
    _check(backend, q.to(torch.bfloat16).to(device), dense, hier, kf.to(device), vf.to(device))


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 5])
def test_ragged_batch_and_verify(device, backend, dtype, n):
    lengths = [5, G - 1, G, 2 * G + 1, 3 * G + 7, 1000]
    dense, hier, kf, vf = make_caches(lengths, hkv=2, d=64, g=32, dtype=dtype, device=device,
                                      decode_steps=3)
    q = torch.randn(len(lengths), 6, n, 64, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    _check(backend, q, dense, hier, kf.to(device), vf.to(device))


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_value_groups_smaller_than_head_dim(device, backend):
    # G = 16 < D = 64: values carry 4 (min, scale) pairs per token
    dense, hier, kf, vf = make_caches([40, 77], hkv=1, d=64, g=16, device=device)
    assert hier.value_group == 16 and hier.v_min.shape[-1] == 4
    q = torch.randn(2, 3, 2, 64).to(torch.bfloat16).to(device)
    _check(backend, q, dense, hier, kf.to(device), vf.to(device))


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_32k(device, backend):
    dense, hier, kf, vf = make_caches([32768], hkv=1, device=device)
    q = torch.randn(1, 4, 1, 128).to(torch.bfloat16).to(device)
    _check(backend, q, dense, hier, kf.to(device), vf.to(device))


def test_verify_equals_sequential_decode():
    # the verify variant's row i equals decoding with the cache cut after token i
    dense, hier, _, _ = make_caches([300], hkv=2, d=64, g=32, dtype=torch.float32)
    q = torch.randn(1, 4, 4, 64)
    outs = {p: ops.flash_decode(q, c, 0, p) for p, c in ((16, dense), (8, hier), (4, hier))}
    for i in range(3, -1, -1):
        for p, c in ((16, dense), (8, hier), (4, hier)):
            one = ops.flash_decode(q[:, :, i:i + 1].contiguous(), c, 0, p)
            torch.testing.assert_close(one, outs[p][:, :, i:i + 1], rtol=1e-5, atol=1e-6)
        dense.rollback(1)
        hier.rollback(1)


def verify_step_cache(starts, n, g, d=64, hkv=2, device="cpu", s=16, seed=3):
    """A float32 hierarchical cache after a prefill of `starts` tokens and one step of n
    tokens per sequence (written in one step, as verification does). Returns (cache, k, v)
    with k, v [B, Hkv, max(starts) + n, D] each sequence's full-precision history."""
    gen = torch.Generator().manual_seed(seed)
    b, total = len(starts), max(starts) + n
    k = torch.randn(b, hkv, total, d, generator=gen)
    v = torch.randn(b, hkv, total, d, generator=gen)
    k[..., 5] += 3.0
    cache = HierarchicalKVCache(1, b, hkv, d, total, torch.float32, device, group_size=g,
                                max_speculative_tokens=s)
    cache.begin_step(starts)
    cache.write(0, k[:, :, :max(starts)].to(device), v[:, :, :max(starts)].to(device))
    cache.begin_step(n)
    new_k = torch.stack([k[i, :, st:st + n] for i, st in enumerate(starts)])
    new_v = torch.stack([v[i, :, st:st + n] for i, st in enumerate(starts)])
    cache.write(0, new_k.to(device), new_v.to(device))
    return cache, k.to(device), v.to(device)


def check_verify_crossing(device, backend, g, n, starts):
    """A verify window of n tokens that crosses a group boundary in some sequences: each
    query row equals single-query decoding of its position (n = 1 on the cache rolled back
    to that length) and the per-row oracle, to fp32 rounding; the final length's n_quant for
    every row (the old semantics) is measurably different on the crossing rows."""
    cache, _, _ = verify_step_cache(starts, n, g, device=device)
    crossing = [quantized_length(st + 1, g) < quantized_length(st + n, g) for st in starts]
    assert any(crossing)
    q = torch.randn(len(starts), 6, n, 64, generator=torch.Generator().manual_seed(4)).to(device)
    scale = 64 ** -0.5
    outs = {}
    for prec in (8, 4):
        with ops.use_backend(backend):
            outs[prec] = ops.flash_decode(q, cache, 0, prec)
        torch.testing.assert_close(outs[prec], per_row_reference(q, cache, prec, scale),
                                   rtol=1e-5, atol=2e-6)
        kd, vd = cache.dequantized(0, prec)
        old = reference.flash_decode(q, kd, vd, cache.lengths, scale)  # final n_quant for all
        gap = (old - outs[prec]).abs().amax(dim=(1, 3))  # [B, n]
        mask = torch.tensor(crossing, device=gap.device)
        assert gap[mask].max() > 1e-3, "no row reads a different prefix"
        if not mask.all():  # windows inside one quantized length: nothing changes
            assert gap[~mask].max() <= 1e-5
    for i in range(n - 1, -1, -1):
        for prec in (8, 4):
            with ops.use_backend(backend):
                one = ops.flash_decode(q[:, :, i:i + 1].contiguous(), cache, 0, prec)
            torch.testing.assert_close(one, outs[prec][:, :, i:i + 1], rtol=1e-5, atol=2e-6)
        cache.rollback(1)


# (G, n, prefill lengths): G = 32 = value group (the vectorized value path), windows crossing
# at their last row, inside, or not at all; G = 4, n = 9: windows crossing two boundaries
# (value groups of 4: the per-token value path)
CROSSING = [(32, 5, [60, 62, 70, 3, 95]), (4, 9, [1, 5, 11, 14])]


@pytest.mark.parametrize("device,backend", compiled_backends() + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("g,n,starts", CROSSING)
def test_verify_window_crossing_group_boundary(device, backend, g, n, starts):
    check_verify_crossing(device, backend, g, n, starts)


def check_long_step(device, backend):
    """A step longer than S + 1 tokens (e.g. chunked prefill): the ring no longer holds the
    early rows' tokens, so those rows read codes up to the ring's oldest whole group. The
    oracle takes the codes below each row's prefix and the true full-precision keys and
    values above it (not the ring), so a row that read an overwritten slot fails."""
    g, s, n, starts = 4, 2, 12, [6, 9]  # ring = 2G + S = 10
    cache, k, v = verify_step_cache(starts, n, g, device=device, s=s)
    rows = reference.kv_row_quant_lengths(cache.lengths, cache.n_quant, n, g, cache.ring)
    # lengths 18 and 21: policy quantized_length(p + 1) [0,0,4,4,4,4,8,8,8,8,12,12] and
    # [4,4,4,8,8,8,8,12,12,12,12,16], raised to the ring's oldest group 8 and 12
    assert rows.tolist() == [[8] * 10 + [12] * 2, [12] * 11 + [16]]
    q = torch.randn(2, 4, n, 64, generator=torch.Generator().manual_seed(5)).to(device)
    for prec in (8, 4):
        kd, vd = cache.dequantized(0, prec)  # codes for [0, n_quant)
        want = reference.flash_decode(q, kd, vd, cache.lengths, 0.125, k, v, rows)
        with ops.use_backend(backend):
            got = ops.flash_decode(q, cache, 0, prec)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("device,backend", compiled_backends() + [pytest.param("cpu", "reference", id="reference")])
def test_step_longer_than_ring_margin(device, backend):
    check_long_step(device, backend)


def test_bad_inputs_named():
    dense, hier, _, _ = make_caches([10, 20], hkv=2, d=64, g=32)
    q = torch.randn(2, 4, 1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="precision"):
        ops.flash_decode(q, dense, 0, 8)
    with pytest.raises(ValueError, match="precision"):
        ops.flash_decode(q, hier, 0, 16)
    with pytest.raises(ValueError, match="precision"):
        ops.flash_decode(q, hier, 0, 3)
    with pytest.raises(ValueError, match="layer"):
        ops.flash_decode(q, hier, 1, 8)
    with pytest.raises(TypeError, match="cache"):
        ops.flash_decode(q, object(), 0, 8)
    with pytest.raises(TypeError, match="dtype"):
        ops.flash_decode(q.float(), hier, 0, 8)
    with pytest.raises(ValueError, match="heads"):
        ops.flash_decode(torch.randn(2, 3, 1, 64).to(torch.bfloat16), hier, 0, 8)
    with pytest.raises(ValueError, match="q has shape"):
        ops.flash_decode(torch.randn(3, 4, 1, 64).to(torch.bfloat16), hier, 0, 8)
    with pytest.raises(ValueError, match="new tokens"):
        ops.flash_decode(torch.randn(2, 4, 11, 64).to(torch.bfloat16), hier, 0, 8)
    with pytest.raises(ValueError, match="4-D|4"):
        ops.flash_decode(q[0], hier, 0, 8)


def test_compile_smoke():
    dense, hier, _, _ = make_caches([50, 70], hkv=2, d=64, g=16)
    q = torch.randn(2, 4, 1, 64).to(torch.bfloat16)
    c = hier

    def fn(q, *ts):
        return torch.ops.qwen3_fast.flash_decode_hier(q, *ts, 8, 16, 0.125, "cpu")

    args = (c.k_u[0], c.k_l[0], c.k_min[0], c.k_scale[0], c.v_u[0], c.v_l[0], c.v_min[0],
            c.v_scale[0], c.k_buf[0], c.v_buf[0], c.n_quant, c.lengths)
    got = torch.compile(fn, fullgraph=True)(q, *args)
    torch.testing.assert_close(got, ops.flash_decode(q, c, 0, 8, scale=0.125))
