"""Triton qk_norm_rope (qwen3_fast/ops/triton/qk_norm_rope.py) against HF math and the CPU kernel.

Same interpreter approach as test_triton_ops.py: without a GPU python_tests/conftest.py sets
TRITON_INTERPRET=1 before triton loads; with a GPU (and no TRITON_INTERPRET) the CPU cases
skip and ``test_cuda_compiled`` runs the compiled kernels.

Forwards compare with the reference on the same dtype (bf16/fp16 within 1 ulp and >= 99%
bit-equal; fp32 to fp32 precision); gradients with HF math in float64 on the same values.

    pytest python_tests/ops/test_triton_qk_norm_rope.py    # ~20 s on 2 CPU cores
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

import qwen3_fast.ops as ops
from qwen3_fast.ops import reference

from conftest import assert_close_to_oracle, require_interpreted_triton, ulp

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed (pip install '.[triton]')"),
]

EPS = 1e-6
YARN = {"head_dim": 0, "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 32768}}
MAX_POS = 131072
_TABLES: dict = {}




@pytest.fixture(scope="module")
def interpreted():
    """TRITON_INTERPRET=1 while this module's CPU tests run (see the module docstring)."""
    require_interpreted_triton({"qwen3_fast.ops.triton.qk_norm_rope": "_qk_norm_rope_forward_kernel"})


def _tables(d: int, device="cpu"):
    if (d, device) not in _TABLES:
        _TABLES[(d, device)] = ops.rope_cache({**YARN, "head_dim": d}, MAX_POS, device=device)
    return _TABLES[(d, device)]




def _assert_forward(actual, expected, dtype, name):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-6, msg=name)
        return
    tol = 2 * ulp(e, dtype) + 2 * torch.finfo(dtype).eps * e.abs().max()
    assert bool(((a - e).abs() <= tol).all()), f"{name}: max |diff| {(a - e).abs().max():.3g}"
    assert (a == e).double().mean() >= 0.99, f"{name}: {(a != e).double().mean():.2%} differ"


def _run(dtype, lead, hq, hkv, d, device="cpu", w_dtype=None, strided=False, seed=0):
    cos, sin = _tables(d, device)
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in lead:
        n *= s
    if strided:  # q and k as views of one fused projection (token stride (hq + hkv) * d)
        qk = (2 * torch.randn(n, (hq + hkv) * d, generator=g)).to(device=device, dtype=dtype)
        qk.requires_grad_()
        q = qk[:, : hq * d].view(*lead, hq, d)
        k = qk[:, hq * d:].view(*lead, hkv, d)
    else:
        q = (2 * torch.randn(*lead, hq, d, generator=g)).to(device=device, dtype=dtype)
        k = (torch.randn(*lead, hkv, d, generator=g) + 0.5).to(device=device, dtype=dtype)
        q.requires_grad_()
        k.requires_grad_()
    w_dtype = w_dtype or dtype
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(device=device, dtype=w_dtype).requires_grad_()
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(device=device, dtype=w_dtype).requires_grad_()
    pos = torch.randint(0, MAX_POS, lead, generator=g).to(device)
    pos.view(-1)[-1] = MAX_POS - 1
    with ops.use_backend("triton"):
        q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
    ref = reference.qk_norm_rope(q.detach(), k.detach(), qw.detach(), kw.detach(), cos, sin,
                                 pos, EPS)
    _assert_forward(q_out, ref[0], dtype, "q_out")
    _assert_forward(k_out, ref[1], dtype, "k_out")
    dq_out = torch.randn(q_out.shape, generator=g).to(device=device, dtype=q_out.dtype)
    dk_out = torch.randn(k_out.shape, generator=g).to(device=device, dtype=k_out.dtype)
    leaves = (q, k, qw, kw)
    grads = torch.autograd.grad((q_out, k_out), leaves, (dq_out, dk_out))
    l64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
    out64 = reference.qk_norm_rope(*l64, cos.double().cpu(), sin.double().cpu(), pos.cpu(), EPS)
    oracle = torch.autograd.grad(out64, l64, (dq_out.double().cpu(), dk_out.double().cpu()))
    for name, got, want in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, oracle):
        assert_close_to_oracle(got.detach().cpu(), want, dtype, scale=2, name=name)
    # in place: the same values written into q and k
    if w_dtype == dtype:
        qi, ki = q.detach().clone(), k.detach().clone()
        with torch.no_grad(), ops.use_backend("triton"):
            ops.qk_norm_rope_(qi, ki, qw.detach(), kw.detach(), cos, sin, pos, EPS)
        assert torch.equal(qi, q_out.detach()) and torch.equal(ki, k_out.detach())


CASES = [  # (lead, hq, hkv, d, strided)
    ((7,), 16, 8, 64, False),
    ((3, 5), 32, 4, 128, False),
    ((5,), 40, 8, 128, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead,hq,hkv,d,strided", CASES)
def test_qk_norm_rope(interpreted, dtype, lead, hq, hkv, d, strided):
    _run(dtype, lead, hq, hkv, d, strided=strided, seed=d + hq)


def test_float32_weights(interpreted):
    _run(torch.bfloat16, (6,), 16, 8, 64, w_dtype=torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("qwen3_fast._C") is None, reason="_C not built")
def test_matches_cpu_kernel_bit_for_bit(interpreted):
    cos, sin = _tables(128)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(9, 32, 128, generator=g).bfloat16()
    k = torch.randn(9, 8, 128, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(128, generator=g)).bfloat16()
    pos = torch.randint(0, MAX_POS, (9,), generator=g)
    outs = {}
    for backend in ("triton", "cpu"):
        with ops.use_backend(backend):
            outs[backend] = ops.qk_norm_rope(q, k, w, w, cos, sin, pos, EPS)
    for a, b in zip(outs["triton"], outs["cpu"]):
        assert (a == b).double().mean() >= 0.99


def test_out_of_range_position_gives_nan_not_a_read(interpreted):
    cos, sin = _tables(64)
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    w = torch.ones(64)
    with ops.use_backend("triton"):
        q_out, k_out = ops.qk_norm_rope(q, k, w, w, cos, sin, torch.tensor([0, MAX_POS, 5]))
    assert q_out[1].isnan().all() and k_out[1].isnan().all()
    assert not q_out[0].isnan().any() and not q_out[2].isnan().any()


def test_zero_tokens(interpreted):
    cos, sin = _tables(64)
    q = torch.randn(0, 2, 64, requires_grad=True)
    k = torch.randn(0, 1, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    with ops.use_backend("triton"):
        q_out, k_out = ops.qk_norm_rope(q, k, w, w, cos, sin, torch.zeros(0, dtype=torch.long))
        (q_out.sum() + k_out.sum()).backward()
    assert q_out.shape == (0, 2, 64) and torch.equal(w.grad, torch.zeros(64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled():
    """The same checks with compiled kernels on a GPU (skips when interpreted)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted; run without it to "
                    "compile them on the GPU")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for lead, hq, hkv, d, strided in CASES + [((4096,), 32, 8, 128, False)]:
            _run(dtype, lead, hq, hkv, d, device="cuda", strided=strided)
    _run(torch.bfloat16, (6,), 16, 8, 64, device="cuda", w_dtype=torch.float32)
