"""rms_norm: qwen3_fast (C++ CPU kernel) vs the reference vs HF Qwen3RMSNorm, bf16.

Run: ``pytest bench/bench_rms_norm.py --benchmark-only``. Bytes counted: forward reads x
and writes y; backward reads dy and x and writes dx (weight-sized terms ignored).
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from _ops_common import DEVICE_IMPLS, HIDDEN, MODES, TOKENS, run_bench


def make_impl(impl: str, w: torch.Tensor):
    if impl in ("qwen3_fast", "cuda", "triton"):
        return lambda x, w: ops.rms_norm(x, w, 1e-6)
    if impl == "reference":
        return lambda x, w: reference.rms_norm(x, w, 1e-6)
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    module = Qwen3RMSNorm(w.shape[0], eps=1e-6)
    module.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    return lambda x, _w: module(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_rms_norm(benchmark, device, impl, tokens, hidden, mode):
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=grad)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(torch.bfloat16).requires_grad_(grad)
    elems = tokens * hidden * 2  # bytes per [T, H] bf16 tensor
    run_bench(benchmark, fn=make_impl(impl, w), inputs=(x, w), mode=mode,
              nbytes_fwd=2 * elems, nbytes_bwd=3 * elems, impl=impl, device=device,
              group=f"rms_norm-{mode}-bf16-T{tokens}-H{hidden}")
