"""silu_and_mul: every available backend against the reference, forward and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3_fast import ops
from qwen3_fast.ops import reference

from conftest import assert_close_to_oracle, compiled_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 2), (1, 246), (7, 246), (3, 2 * 5121), (64, 2 * 768), (2, 3, 2 * 3072)]


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(device, backend, dtype, shape):
    torch.manual_seed(0)
    gu = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    with ops.use_backend(backend):
        y = ops.silu_and_mul(gu)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    assert_close_to_oracle(y, reference.silu_and_mul(gu).double(), dtype, name="y vs same-dtype")
    dy = torch.randn_like(y)
    (dgu,) = torch.autograd.grad(y, gu, dy)
    gu64 = gu.detach().double().requires_grad_()
    y64 = reference.silu_and_mul(gu64)
    (dgu64,) = torch.autograd.grad(y64, gu64, dy.double())
    assert_close_to_oracle(y, y64, dtype, name="y")
    assert_close_to_oracle(dgu, dgu64, dtype, scale=2, name="dgate_up")


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_extreme_values(device, backend):
    g = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4], device=device)
    gu = torch.cat([g, torch.full_like(g, 2.0)]).unsqueeze(0)
    with ops.use_backend(backend):
        y = ops.silu_and_mul(gu)
    torch.testing.assert_close(y, F.silu(g).unsqueeze(0) * 2.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_bf16_large_output_bit_exact(device, backend):
    # y of 4100 x 8192 bf16 is 67.2 MB, over the CPU kernel's 64 MiB streaming-store
    # threshold, so the non-temporal store path runs (with the NaN/inf specials in row 0).
    torch.manual_seed(0)
    gu = torch.randn(4100, 2 * 8192, device=device, dtype=torch.bfloat16).mul_(4)
    gu[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 90.0])
    with ops.use_backend(backend):
        y = ops.silu_and_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    inf = float("inf")  # compare everything but NaN bit-exactly, infinities included
    assert torch.equal(y.nan_to_num(0.0, inf, -inf), expected.nan_to_num(0.0, inf, -inf))


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_bf16_special_values_bit_exact(device, backend):
    # 48 columns: the 16-wide vector path (AVX-512 on CPU) and a scalar tail both run
    g = torch.tensor([-1e4, -100.0, -87.5, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.9, 100.0, 1e4,
                      float("inf"), float("-inf"), float("nan"), -0.0, 3.0] * 3, device=device)
    gu = torch.cat([g, torch.linspace(-3, 3, 48, device=device)]).unsqueeze(0).to(torch.bfloat16)
    with ops.use_backend(backend):
        y = ops.silu_and_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    keep = ~torch.isnan(expected)
    assert torch.equal(y[keep], expected[keep])


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_row_strided_input_matches_hf_mlp_bit_exact(device, backend):
    torch.manual_seed(3)
    wide = torch.randn(5, 1000, device=device, dtype=torch.bfloat16)
    gu = wide[:, :2 * 384]  # row stride 1000
    gate, up = gu.chunk(2, dim=-1)
    with ops.use_backend(backend):
        y = ops.silu_and_mul(gu)
    # HF Qwen3MLP: act_fn(gate_proj(x)) * up_proj(x) in bf16
    assert torch.equal(y, F.silu(gate) * up)


def test_float64_gradcheck():
    gu = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.silu_and_mul, (gu,))


def test_opcheck_custom_ops():
    gu = torch.randn(4, 18, requires_grad=True)
    torch.library.opcheck(torch.ops.qwen3_fast.silu_and_mul_fwd.default, (gu, "cpu"))
    torch.library.opcheck(torch.ops.qwen3_fast.silu_and_mul_bwd.default,
                          (torch.randn(4, 9), gu.detach(), "cpu"))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.silu_and_mul(torch.randn(4, 7)), ValueError, "even size"),
    (lambda: ops.silu_and_mul(torch.randn(4, 0)), ValueError, "gate_up has an empty last"),
    (lambda: ops.silu_and_mul(torch.randint(0, 5, (4, 8))), TypeError, "gate_up has dtype"),
    (lambda: ops.silu_and_mul(torch.randn(8, 4).t()), ValueError, "gate_up must be contiguous"),
    (lambda: ops.silu_and_mul(None), TypeError, "gate_up must be a torch.Tensor"),
])
def test_bad_inputs_are_named(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()
