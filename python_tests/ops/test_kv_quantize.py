"""kv_quantize: kernels against the reference bit for bit, format invariants, error bounds
(DESIGN.md "KV caches": 8-bit |x - deq| <= s/32, 4-bit <= 17/32 s, up to fp32 rounding),
constant groups, bad inputs.

    pytest python_tests/ops/test_kv_quantize.py     # a few seconds on 2 CPU cores
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from conftest import compiled_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _data(shape, dtype, outliers=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if outliers:  # heavy tails and a few huge channels, as real keys have
        x = x * torch.exp(2 * torch.randn(shape, generator=g))
        x[..., min(3, shape[-1] - 1)] *= 50.0
    return x.to(dtype)


def _bound_check(x, u, lo, mn, s, kind, g):
    for bits, frac in ((8, 1 / 32), (4, 17 / 32)):
        deq = reference.kv_dequantize(u, lo, mn, s, kind, g, bits)
        sf = s.float()
        sb = sf.unsqueeze(-2).expand(*sf.shape[:-1], g, sf.shape[-1]).reshape(x.shape) \
            if kind == "key" else sf.unsqueeze(-1).expand(*sf.shape, g).reshape(x.shape)
        err = (x.float() - deq).abs()
        slack = 1e-5 * (x.float().abs() + sb * 16)  # fp32 rounding of the dequant expression
        assert (err <= frac * sb + slack).all(), f"{bits}-bit error {(err - frac * sb).max()}"


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape,g", [("key", (2, 3, 256, 128), 128), ("key", (1, 16, 6), 16),
                                          ("key", (5, 2, 64), 2), ("value", (4, 7, 128), 128),
                                          ("value", (3, 96), 32), ("value", (1, 2), 2)])
@pytest.mark.parametrize("outliers", [False, True])
def test_matches_reference_and_bounds(device, backend, dtype, kind, shape, g, outliers):
    x = _data(shape, dtype, outliers).to(device)
    with ops.use_backend(backend):
        got = ops.kv_quantize(x, kind, g)
    want = reference.kv_quantize(x, kind, g)
    for name, a, b in zip(("U", "L", "min", "scale"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs in {(a != b).sum()} places"
    u, lo, mn, s = got
    assert int(u.max()) <= 0xFF and mn.dtype == dtype and s.dtype == dtype
    c = 16 * reference.kv_unpack_nibbles(u) + reference.kv_unpack_nibbles(lo) - 8
    assert c.min() >= 0 and c.max() <= 240
    _bound_check(x.cpu(), u.cpu(), lo.cpu(), mn.cpu(), s.cpu(), kind, g)


def test_split_is_exact_code():
    # every code 0..240 survives the U/L split: 16U + L - 8 == c, U and L in 0..15
    c = torch.arange(241)
    u = (c + 8) >> 4
    lo = c - 16 * u + 8
    assert (u.min(), u.max(), lo.min(), lo.max()) == (0, 15, 0, 15)
    assert torch.equal(16 * u + lo - 8, c)


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_constant_groups_no_nan(device, backend):
    x = torch.full((2, 32, 8), 3.25, dtype=torch.bfloat16, device=device)
    x[1] = 0
    with ops.use_backend(backend):
        u, lo, mn, s = ops.kv_quantize(x, "key", 16)
        for bits in (8, 4):
            deq = ops.kv_dequantize(u, lo, mn, s, "key", 16, bits)
            assert torch.isfinite(deq).all() and torch.equal(deq, x.float())
        vu, vl, vmn, vs = ops.kv_quantize(x, "value", 8)
    assert (s == 0).all() and (vs == 0).all()
    assert torch.equal(reference.kv_dequantize(vu, vl, vmn, vs, "value", 8), x.float())


def test_pack_roundtrip():
    n = torch.randint(0, 16, (3, 10))
    assert torch.equal(reference.kv_unpack_nibbles(reference.kv_pack_nibbles(n)), n)


def test_bad_inputs_named():
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="kind"):
        ops.kv_quantize(x, "query", 16)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ops.kv_quantize(x, "key", 32)
    with pytest.raises(ValueError, match="group_size"):
        ops.kv_quantize(x, "key", 3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ops.kv_quantize(x, "value", 16)
    with pytest.raises(TypeError, match="x"):
        ops.kv_quantize(x.to(torch.int32), "key", 16)
    with pytest.raises(ValueError, match="even"):
        ops.kv_quantize(torch.randn(16, 7), "key", 16)
    with pytest.raises(ValueError, match="bits"):
        ops.kv_dequantize(*ops.kv_quantize(x, "key", 16), "key", 16, bits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,shape,g", [("key", (3, 2, 48, 10), 24), ("key", (256, 128), 128),
                                          ("value", (5, 3, 96), 32), ("value", (7, 8), 8)])
def test_dequantize_kernel_equals_reference(dtype, kind, shape, g):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    u, lo, mn, s = reference.kv_quantize(x, kind, g)
    for bits in (8, 4):
        got = ops.kv_dequantize(u, lo, mn, s, kind, g, bits)  # CPU C++ kernel
        want = reference.kv_dequantize(u, lo, mn, s, kind, g, bits)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(got, want), f"bits {bits}: {(got != want).sum()} differ"
    with pytest.raises(ValueError, match="u has shape"):
        ops.kv_dequantize(u[..., :-1], lo[..., :-1], mn, s, kind, g)


def test_dequantize_compile_smoke():
    u, lo, mn, s = reference.kv_quantize(torch.randn(2, 32, 16, dtype=torch.bfloat16), "key", 16)
    fn = torch.compile(lambda *t: ops.kv_dequantize(*t, "key", 16, 8), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(u, lo, mn, s), reference.kv_dequantize(u, lo, mn, s, "key", 16))


def test_compile_smoke():
    x = torch.randn(2, 32, 16, dtype=torch.bfloat16)
    fn = torch.compile(lambda t: ops.kv_quantize(t, "key", 16), fullgraph=True)
    for a, b in zip(fn(x), reference.kv_quantize(x, "key", 16)):
        assert torch.equal(a, b)
