"""Triton kv_quantize and flash_decode (qwen3_fast/ops/triton/) against the reference.

On the CPU the kernels run in the Triton interpreter (python_tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU, before triton is imported); with a GPU they compile
and run on CUDA tensors. kv_quantize must be bit-exact; flash_decode must equal attention
over the dequantized cache to fp32 rounding (plus one rounding to the output dtype).

    pytest python_tests/ops/test_triton_kv.py     # ~2 min on 2 shared CPU cores (interpreter)
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from test_flash_decode import (CROSSING, check_long_step, check_verify_crossing, make_caches,
                               per_row_reference)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark.append(pytest.mark.skip(reason="Triton on CPU needs TRITON_INTERPRET=1 at start"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,shape,g", [("key", (2, 3, 64, 32), 16), ("key", (1, 128, 128), 128),
                                          ("value", (5, 3, 64), 64), ("value", (7, 32), 16)])
def test_kv_quantize_bit_exact(dtype, kind, shape, g):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    x.view(-1, shape[-1])[:3] = 0.75  # some constant groups
    x = x.to(dtype).to(DEVICE)
    with ops.use_backend("triton"):
        got = ops.kv_quantize(x, kind, g)
    for name, a, b in zip(("U", "L", "min", "scale"), got, reference.kv_quantize(x, kind, g)):
        assert torch.equal(a, b), f"{name}: {(a != b).sum()} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,n", [([1], 1), ([15], 1), ([16], 1), ([33], 1), ([200], 1),
                                       ([5, 31, 32, 65, 200], 1), ([9, 40, 100], 4)])
def test_flash_decode_matches_reference(dtype, lengths, n):
    dense, hier, _, _ = make_caches(lengths, hkv=2, d=64, g=16, dtype=dtype, device=DEVICE,
                                    decode_steps=2)
    q = torch.randn(len(lengths), 6, n, 64, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype).to(DEVICE)
    for prec, cache in ((16, dense), (8, hier), (4, hier)):
        with ops.use_backend("triton"):
            out = ops.flash_decode(q, cache, 0, prec)
        want = per_row_reference(q, cache, prec, 64 ** -0.5)  # row i: its own n_quant
        tol = 2e-6 if dtype == torch.float32 else 8e-3
        err = (out.float() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), f"precision {prec}: {err}"


@pytest.mark.parametrize("g,n,starts", CROSSING)
def test_flash_decode_verify_crossing_group_boundary(g, n, starts):
    check_verify_crossing(DEVICE, "triton", g, n, starts)


def test_flash_decode_step_longer_than_ring_margin():
    check_long_step(DEVICE, "triton")
