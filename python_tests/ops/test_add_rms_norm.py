"""add_rms_norm: every available backend against the reference, forward and gradients."""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from conftest import assert_close_to_oracle, compiled_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 123), (7, 123), (3, 5121), (64, 1024), (5, 2, 4096)]


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(device, backend, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    r = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    with ops.use_backend(backend):
        y, new_r = ops.add_rms_norm(x, r, w, 1e-6)
    y_ref, new_r_ref = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(new_r, new_r_ref), "the residual add must round exactly like x + residual"
    assert_close_to_oracle(y, y_ref.double(), dtype, name="y vs same-dtype reference")

    dy, dr = torch.randn_like(y), torch.randn_like(new_r)
    grads = torch.autograd.grad((y, new_r), (x, r, w), (dy, dr))
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    y64, nr64 = reference.add_rms_norm(x64, r64, w64, 1e-6)
    grads64 = torch.autograd.grad((y64, nr64), (x64, r64, w64), (dy.double(), dr.double()))
    # the oracle adds in float64 while the kernel rounds x + residual to dtype first
    for name, g, g64 in zip(("dx", "dresidual", "dw"), grads, grads64):
        assert_close_to_oracle(g, g64, dtype, scale=2, name=name)


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_unused_new_residual_gradient(device, backend):
    x = torch.randn(4, 50, device=device, requires_grad=True)
    r = torch.randn(4, 50, device=device, requires_grad=True)
    w = torch.randn(50, device=device, requires_grad=True)
    with ops.use_backend(backend):
        y, _ = ops.add_rms_norm(x, r, w)
    y.square().sum().backward()
    yr, _ = reference.add_rms_norm(x, r, w, 1e-6)
    gx, gw = torch.autograd.grad(yr.square().sum(), (x, w))
    torch.testing.assert_close(x.grad, gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.grad, gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-5)


def test_float64_gradcheck():
    args = [torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-6), (*args, w))


def test_opcheck_custom_op():
    x, r = torch.randn(5, 33, requires_grad=True), torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    torch.library.opcheck(torch.ops.qwen3_fast.add_rms_norm_fwd.default, (x, r, w, 1e-6, "cpu"))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, r, w: ops.add_rms_norm(x, r[:, :-1], w), ValueError, "residual has shape"),
    (lambda x, r, w: ops.add_rms_norm(x, r.double(), w), TypeError, "residual has dtype"),
    (lambda x, r, w: ops.add_rms_norm(x, r.to("meta"), w), ValueError, "residual is on meta"),
    (lambda x, r, w: ops.add_rms_norm(x, None, w), TypeError, "residual must be a torch.Tensor"),
    (lambda x, r, w: ops.add_rms_norm(x, r, w[:3]), ValueError, "x has last dimension 16; expected 3"),
    (lambda x, r, w: ops.add_rms_norm(x.short(), r, w), TypeError, "x has dtype"),
])
def test_bad_inputs_are_named(bad, exc, match):
    x, r, w = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16)
    with pytest.raises(exc, match=match):
        bad(x, r, w)
