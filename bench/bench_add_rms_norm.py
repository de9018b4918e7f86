"""add_rms_norm: qwen3_fast (fused C++ kernel) vs the reference vs HF's decoder-layer
pattern (``residual + h`` then ``Qwen3RMSNorm``), bf16.

Run: ``pytest bench/bench_add_rms_norm.py --benchmark-only``. Bytes counted: forward reads
x and residual and writes y and new_residual; backward reads dy, d_new_residual and
new_residual and writes dx (the same gradient serves x and residual).
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from _ops_common import DEVICE_IMPLS, HIDDEN, MODES, TOKENS, run_bench


def make_impl(impl: str, w: torch.Tensor):
    if impl in ("qwen3_fast", "cuda", "triton"):
        return lambda x, r, w: ops.add_rms_norm(x, r, w, 1e-6)
    if impl == "reference":
        return lambda x, r, w: reference.add_rms_norm(x, r, w, 1e-6)
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    module = Qwen3RMSNorm(w.shape[0], eps=1e-6)
    module.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)

    def hf(x, r, _w):
        new_residual = r + x
        return module(new_residual), new_residual

    return hf


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_add_rms_norm(benchmark, device, impl, tokens, hidden, mode):
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=grad)
    r = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=grad)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(torch.bfloat16).requires_grad_(grad)
    elems = tokens * hidden * 2
    run_bench(benchmark, fn=make_impl(impl, w), inputs=(x, r, w), mode=mode,
              nbytes_fwd=4 * elems, nbytes_bwd=4 * elems, impl=impl, device=device,
              group=f"add_rms_norm-{mode}-bf16-T{tokens}-H{hidden}")
