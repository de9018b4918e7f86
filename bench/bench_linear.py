"""linear (decode-shaped, 1 or 8 rows): qwen3_fast (csrc/cpu/linear.cpp on bf16 CPU) vs
torch.nn.functional.linear (what nn.Linear / HF eager run) vs the float32 reference, bf16.

Run: ``pytest bench/bench_linear.py --benchmark-only``. Bytes counted: the weight N*K*2
(read once, the whole cost of decode) plus x and y. ``extra_info.bandwidth`` is the
machine's measured memory bandwidth (bench/_bandwidth.py): bytes / time / bandwidth is the
fraction of it a call reaches. Shapes (N, K) are Qwen3 projections: 0.6B q/o (2048x1024,
1024x2048 are close to 1024x1024 here), gate_up-like 6144x1024, down-like 1024x3072,
lm_head 151936x1024, and 8B-like 4096x4096. CPU only: on CUDA ops.linear is F.linear.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3_fast import ops
from qwen3_fast.ops import reference

from _ops_common import run_bench

IMPLS = [pytest.param("cpu", impl, id=f"cpu-{impl}") for impl in ("qwen3_fast", "torch", "reference")]
# (N, K); the id "1024-1024" with rows 1 makes the CI smoke filter "-1-1024-" pick it
SHAPES = [(1024, 1024), (3072, 1024), (6144, 1024), (1024, 3072), (4096, 4096), (151936, 1024)]


def make_impl(impl: str):
    if impl == "qwen3_fast":
        return ops.linear
    if impl == "torch":
        return F.linear
    return reference.linear


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("device,impl", IMPLS)
def test_linear(benchmark, device, impl, rows, shape):
    torch.manual_seed(0)
    n, k = shape
    x = torch.randn(rows, k, dtype=torch.bfloat16, device=device)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(torch.bfloat16)
    nbytes = 2 * (n * k + rows * k + rows * n)
    run_bench(benchmark, fn=make_impl(impl), inputs=(x, w), mode="fwd", nbytes_fwd=nbytes,
              nbytes_bwd=0, impl=impl, device=device, group=f"linear-fwd-bf16-M{rows}-N{n}-K{k}")
