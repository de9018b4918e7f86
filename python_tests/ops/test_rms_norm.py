"""rms_norm: every available backend against the reference, forward and gradients."""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from conftest import assert_close_to_oracle, compiled_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 123), (7, 123), (3, 5121), (64, 1024), (5, 2, 4096)]


def _oracle(x, w, eps, dy):
    """Reference forward and gradients computed in float64 from the same inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = reference.rms_norm(x64, w64, eps)
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(device, backend, dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    with ops.use_backend(backend):
        y = ops.rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    # the same-dtype HF computation: bit-exact up to one rounding of the last cast
    y_same = reference.rms_norm(x, w, 1e-6)
    assert_close_to_oracle(y, y_same.double(), dtype, name="y vs same-dtype reference")
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, dx64, dw64 = _oracle(x, w, 1e-6, dy)
    assert_close_to_oracle(y, y64, dtype, name="y")
    assert_close_to_oracle(dx, dx64, dtype, scale=2, name="dx")
    assert_close_to_oracle(dw, dw64, dtype, scale=2, name="dw")


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_promotes_like_hf(device, backend, dtype):
    x = torch.randn(9, 77, device=device).to(dtype)
    w = torch.randn(77, device=device)
    with ops.use_backend(backend):
        y = ops.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32 == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_row_strided_input(device, backend):
    base = torch.randn(6, 300, device=device, dtype=torch.bfloat16)
    x = base[:, 10:133]  # row stride 300, unit column stride: no copy needed
    w = torch.randn(123, device=device, dtype=torch.bfloat16)
    with ops.use_backend(backend):
        y = ops.rms_norm(x, w)
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-6), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_bf16_bit_exact_with_hf_module(device, backend):
    pytest.importorskip("transformers")
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(1)
    hf = Qwen3RMSNorm(1024, eps=1e-6).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        hf.weight.normal_(1.0, 0.1)
    ours = ops.RMSNorm(1024, eps=1e-6, device=device, dtype=torch.bfloat16)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(33, 1024, device=device, dtype=torch.bfloat16) * 4
    with ops.use_backend(backend):
        y = ours(x)
    # fp32 sums in a different order can move rstd by an ulp; allow one bf16 ulp.
    torch.testing.assert_close(y, hf(x), rtol=8e-3, atol=1e-6)
    assert (y != hf(x)).float().mean() < 0.01


def test_float64_uses_reference_and_gradchecks():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-6), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: reference.rms_norm(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_zero_rows_give_empty_output(device, backend):
    x = torch.randn(0, 64, device=device)
    w = torch.randn(64, device=device, requires_grad=True)
    with ops.use_backend(backend):
        y = ops.rms_norm(x.requires_grad_(), w)
        y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros(64, device=device))


def test_opcheck_custom_ops():
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    torch.library.opcheck(torch.ops.qwen3_fast.rms_norm_fwd.default, (x, w, 1e-6, "cpu"))
    rstd = torch.rand(5) + 0.5
    torch.library.opcheck(torch.ops.qwen3_fast.rms_norm_bwd.default,
                          (torch.randn(5, 33), x.detach(), w.detach(), rstd, None, "cpu"))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, w: ops.rms_norm(x.int(), w), TypeError, "x has dtype"),
    (lambda x, w: ops.rms_norm(x, w.half()), TypeError, "weight has dtype"),
    (lambda x, w: ops.rms_norm(x, w[:-1]), ValueError, "x has last dimension 16; expected 15"),
    (lambda x, w: ops.rms_norm(x, w.view(4, 4)), ValueError, "weight must be 1-D"),
    (lambda x, w: ops.rms_norm(x.t(), torch.randn(8)), ValueError, "x must be contiguous in its last"),
    (lambda x, w: ops.rms_norm(x[:, :0], w[:0]), ValueError, "x has an empty last dimension"),
    (lambda x, w: ops.rms_norm(x, w.to("meta")), ValueError, "weight is on meta"),
    (lambda x, w: ops.rms_norm(x, w, -1.0), ValueError, "eps must be"),
    (lambda x, w: ops.rms_norm(x, w, "1e-6"), TypeError, "eps must be a float"),
    (lambda x, w: ops.rms_norm(x.tolist(), w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: ops.rms_norm(x[0, 0], w), ValueError, "x must have at least 1"),
])
def test_bad_inputs_are_named(bad, exc, match):
    x = torch.randn(8, 16)
    w = torch.randn(16)
    with pytest.raises(exc, match=match):
        bad(x, w)


def test_bad_inputs_raise_on_every_backend():
    for backend in ("reference", "cpu"):
        with ops.use_backend(backend), pytest.raises(TypeError, match="weight has dtype"):
            ops.rms_norm(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(4, dtype=torch.float16))
