"""Triton kernels (qwen3_fast/ops/triton/) against qwen3_fast.ops.reference.

Runs on CPU tensors through the Triton interpreter and, with a GPU, on CUDA tensors with
compiled kernels. Triton decides interpreted-or-compiled when triton and a kernel module
are first imported, so one process is one or the other: without a GPU python_tests/
conftest.py sets TRITON_INTERPRET=1 before anything imports triton; with a GPU the CPU
tests skip and the CUDA test compiles (set TRITON_INTERPRET=1 to test the interpreter).

Forwards compare with the reference run on the same dtype (bit-exact up to 1 ulp of the
dtype where the fp32 sum order flips a rounding); gradients compare with the reference
run in float32 on the same (upcast) values, with per-dtype tolerances.

    pytest python_tests/ops/test_triton_ops.py        # about 30 s on 2 CPU cores
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

import qwen3_fast.ops as ops
from qwen3_fast.ops import reference

from conftest import require_interpreted_triton, ulp

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed (pip install '.[triton]')"),
]

_KERNELS = (("rms_norm", "_rms_norm_forward_kernel"),
            ("add_rms_norm", "_add_rms_norm_forward_kernel"),
            ("silu_and_mul", "_silu_and_mul_forward_kernel"))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
# Gradients against float32 on the same values: the kernels round once at the end (and
# dweight uses n rounded to x's dtype, as HF's forward does).
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=3e-3)}




@pytest.fixture(scope="module")
def interpreted():
    """TRITON_INTERPRET=1 while this module's CPU tests run (see the module docstring)."""
    require_interpreted_triton({f"qwen3_fast.ops.triton.{m}": k for m, k in _KERNELS})


def _randn(*shape, dtype, seed: int, device="cpu", scale=1.0, shift=0.0) -> torch.Tensor:
    """Seeded values, the same on every device, rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)


def _rows_of(rows, cols, dtype, strided, seed, device="cpu", scale=1.0) -> torch.Tensor:
    """[rows, cols] leaf, or a row-strided view of a wider leaf when `strided`."""
    if not strided:
        return _randn(rows, cols, dtype=dtype, seed=seed, device=device,
                      scale=scale).requires_grad_()
    wide = _randn(rows, cols + 5, dtype=dtype, seed=seed, device=device, scale=scale)
    return wide.requires_grad_()[:, 2:2 + cols]




def _assert_forward(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Against the reference on the same dtype: within 1 ulp of `dtype` (x's dtype, whose
    rounding of n can flip with the fp32 sum order) and bit-exact almost everywhere.
    float32 gets torch's float32 tolerance: exp, rsqrt and sum order differ by a few ulps."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.numel() == 0:
        return
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected)
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = (a - e).abs() > ulp(e, dtype)
    assert not bad.any(), (f"{int(bad.sum())}/{a.numel()} values off by more than 1 ulp; "
                           f"max |diff| {(a - e).abs().max().item():.3g}")
    assert (a == e).double().mean() >= 0.98


def _check_grad(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Against float32 autograd of the reference on the same (upcast) values."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected, **GRAD_TOL[dtype])


def _expected_dw(dy: torch.Tensor, x: torch.Tensor, w_dtype: torch.dtype) -> torch.Tensor:
    """HF RMSNorm's weight gradient: sum over rows of dy * n with n rounded to x's dtype,
    as the forward multiplies it (float32 autograd would leave n unrounded)."""
    n = reference.rms_norm(x.detach(), torch.ones_like(x[0]), EPS)  # exact: ones * n
    return (dy.float() * n.float()).sum(0).to(w_dtype)


def _check_dw(actual: torch.Tensor, expected: torch.Tensor, x_dtype: torch.dtype) -> None:
    """Close everywhere and, but for rare flips of n's rounding, within 1 ulp (fp32: 1e-6)."""
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **GRAD_TOL[x_dtype])
    a, e = actual.double().cpu(), expected.double().cpu()
    tight = (a - e).abs() <= torch.maximum(ulp(e, actual.dtype), 1e-6 * (1 + e.abs()))
    assert tight.double().mean() >= 0.98, f"{int((~tight).sum())}/{a.numel()} not within 1 ulp"


# ------------------------------------------------------------------ one check per op
def _run_rms_norm(dtype, rows, hidden, strided, device="cpu", w_dtype=None):
    w_dtype = w_dtype or dtype
    x = _rows_of(rows, hidden, dtype, strided, seed=hidden + rows, device=device)
    w = _randn(hidden, dtype=w_dtype, seed=1, device=device, scale=0.1, shift=1.0)
    w.requires_grad_()
    with ops.use_backend("triton"):
        y = ops.rms_norm(x, w, EPS)
    _assert_forward(y, reference.rms_norm(x.detach(), w.detach(), EPS), dtype)
    dy = _randn(*y.shape, dtype=y.dtype, seed=2, device=device)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32 = x.detach().float().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference.rms_norm(x32, w.detach().float(), EPS), x32,
                                    dy.float())
    _check_grad(dx, dx_ref, dtype)
    _check_dw(dw, _expected_dw(dy, x, w_dtype), dtype)


def _run_add_rms_norm(dtype, rows, hidden, strided, device="cpu"):
    x = _rows_of(rows, hidden, dtype, strided, seed=hidden, device=device)
    res = _rows_of(rows, hidden, dtype, not strided, seed=hidden + 1, device=device)
    w = _randn(hidden, dtype=dtype, seed=1, device=device, scale=0.1, shift=1.0)
    w.requires_grad_()
    with ops.use_backend("triton"):
        y, new_res = ops.add_rms_norm(x, res, w, EPS)
    y_ref, new_res_ref = reference.add_rms_norm(x.detach(), res.detach(), w.detach(), EPS)
    assert torch.equal(new_res, new_res_ref)
    _assert_forward(y, y_ref, dtype)
    dy = _randn(*y.shape, dtype=dtype, seed=2, device=device)
    dnew = _randn(*y.shape, dtype=dtype, seed=3, device=device)
    dx, dres, dw = torch.autograd.grad((y, new_res), (x, res, w), (dy, dnew))
    x32, res32 = (t.detach().float().requires_grad_() for t in (x, res))
    dx_ref, dres_ref = torch.autograd.grad(
        reference.add_rms_norm(x32, res32, w.detach().float(), EPS), (x32, res32),
        (dy.float(), dnew.float()))
    _check_grad(dx, dx_ref, dtype)
    _check_grad(dres, dres_ref, dtype)
    _check_dw(dw, _expected_dw(dy, new_res_ref, dtype), dtype)


def _run_silu_and_mul(dtype, rows, inter, strided, device="cpu"):
    # scale 3 spreads gate over silu's curved range, negative tail included
    gate_up = _rows_of(rows, 2 * inter, dtype, strided, seed=inter, device=device, scale=3.0)
    with ops.use_backend("triton"):
        y = ops.silu_and_mul(gate_up)
    _assert_forward(y, reference.silu_and_mul(gate_up.detach()), dtype)
    dy = _randn(*y.shape, dtype=dtype, seed=2, device=device)
    (dgu,) = torch.autograd.grad(y, gate_up, dy)
    g32 = gate_up.detach().float().requires_grad_()
    (dgu_ref,) = torch.autograd.grad(reference.silu_and_mul(g32), g32, dy.float())
    _check_grad(dgu, dgu_ref, dtype)


# ------------------------------------------------------------------ CPU (interpreter)
SHAPES = [(1, 1, False), (7, 123, False), (7, 256, False), (7, 123, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden,strided", SHAPES)
def test_rms_norm(interpreted, dtype, rows, hidden, strided):
    _run_rms_norm(dtype, rows, hidden, strided)


def test_rms_norm_fp32_weight(interpreted):
    _run_rms_norm(torch.bfloat16, 7, 123, True, w_dtype=torch.float32)


@pytest.mark.parametrize("rows,hidden", [(3, 5121), (2, 16384)])
def test_rms_norm_wide(interpreted, rows, hidden):
    _run_rms_norm(torch.bfloat16, rows, hidden, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden,strided", SHAPES)
def test_add_rms_norm(interpreted, dtype, rows, hidden, strided):
    _run_add_rms_norm(dtype, rows, hidden, strided)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,inter,strided", SHAPES)
def test_silu_and_mul(interpreted, dtype, rows, inter, strided):
    _run_silu_and_mul(dtype, rows, inter, strided)


def test_zero_rows(interpreted):
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    with ops.use_backend("triton"):
        y = ops.rms_norm(x, w, EPS)
        y2, new_res = ops.add_rms_norm(x, x, w, EPS)
        s = ops.silu_and_mul(x)
    assert y.shape == y2.shape == new_res.shape == (0, 8) and s.shape == (0, 4)
    dx, dw = torch.autograd.grad((y.sum() + y2.sum() + new_res.sum() + s.sum()), (x, w))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


# ------------------------------------------------------------------ GPU (compiled)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled():
    """Compiled kernels: bf16 and fp16, odd and wide shapes, forward and gradients."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted; run without it to "
                    "test the compiled kernels")
    for dtype in (torch.bfloat16, torch.float16):
        for rows, hidden, strided in [(1, 1, False), (5, 123, True), (33, 5121, True),
                                      (300, 4096, False), (4, 16384, False)]:
            _run_rms_norm(dtype, rows, hidden, strided, device="cuda")
            _run_add_rms_norm(dtype, rows, hidden, strided, device="cuda")
            _run_silu_and_mul(dtype, rows, hidden, strided, device="cuda")
    _run_rms_norm(torch.bfloat16, 9, 5121, True, device="cuda", w_dtype=torch.float32)
    _run_rms_norm(torch.float32, 9, 5121, True, device="cuda")
