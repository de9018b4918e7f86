"""silu_and_mul: qwen3_fast (C++ kernel) vs the reference vs HF's ``ACT2FN["silu"](gate) * up``.

Shapes: Qwen3 intermediate sizes I = 3072 (0.6B, H 1024) and 12288 (8B, H 4096), bf16.
Run: ``pytest bench/bench_silu_and_mul.py --benchmark-only``. Bytes counted: forward reads
gate_up [T, 2I] and writes y [T, I]; backward reads dy and gate_up and writes d_gate_up.
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from _ops_common import DEVICE_IMPLS, MODES, TOKENS, run_bench

INTER = {1024: 3072, 4096: 12288}


def make_impl(impl: str):
    if impl in ("qwen3_fast", "cuda", "triton"):
        return ops.silu_and_mul
    if impl == "reference":
        return reference.silu_and_mul
    from transformers.activations import ACT2FN

    act = ACT2FN["silu"]

    def hf(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return hf


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", sorted(INTER))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_silu_and_mul(benchmark, device, impl, tokens, hidden, mode):
    torch.manual_seed(0)
    inter = INTER[hidden]
    gu = torch.randn(tokens, 2 * inter, dtype=torch.bfloat16, device=device, requires_grad=mode == "fwd+bwd")
    elems = tokens * inter * 2
    run_bench(benchmark, fn=make_impl(impl), inputs=(gu,), mode=mode,
              nbytes_fwd=3 * elems, nbytes_bwd=5 * elems, impl=impl, device=device,
              group=f"silu_and_mul-{mode}-bf16-T{tokens}-I{inter}")
