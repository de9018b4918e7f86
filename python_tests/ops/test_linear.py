"""linear: the skinny bf16 CPU kernel (csrc/cpu/linear.cpp) and the torch paths against a
float64 oracle, forward and both gradients; the dispatch (kernel only for CPU bf16 with
1..16 rows); bad inputs named; opcheck and torch.compile.

    pytest python_tests/ops/test_linear.py        # a few seconds on 2 CPU cores
"""
from __future__ import annotations

import importlib

import pytest
import torch

from qwen3_fast import _ext, ops

from conftest import assert_close_to_oracle, compiled_backends

# (N, K): odd N (a partial 4-row weight tile), K with a masked tail (130 = 4*32 + 2, 31 odd)
SHAPES = [(1000, 1024), (17, 130), (7, 200), (5, 31), (9, 1500)]  # k: 128-blocks, + tails of 32s and a mask
ROWS = [1, 2, 3, 5, 7, 8, 9, 16]  # 1-2 rows (and 3-8 at k <= 1024): one weight row at a time; else 4 x 4 tiles
_NEEDS_C = pytest.mark.skipif(not (_ext.available() and hasattr(_ext.extension(), "linear_cpu")),
                              reason="_C not built, or built before linear_cpu existed")


def _inputs(rows, n, k, dtype, device="cpu", lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, k) if lead is None else (*lead, k)
    x = torch.randn(shape, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    return x, w


def _check(x, w, backend, dtype):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    with ops.use_backend(backend):
        y = ops.linear(x, w)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = w.detach().cpu().double().requires_grad_()
    y64 = x64 @ w64.t()
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.cpu().double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert y.shape == (*x.shape[:-1], w.shape[0])
    scale = max(1.0, x.shape[-1] / 256)  # fp32 accumulation error grows with K
    assert_close_to_oracle(y.cpu(), y64, dtype, scale=scale, name="y")
    assert_close_to_oracle(dx.cpu(), dx64, dtype, scale=max(1.0, w.shape[0] / 256), name="dx")
    assert_close_to_oracle(dw.cpu(), dw64, dtype, scale=max(1.0, dy.numel() / dy.shape[-1] / 16),
                           name="dw")


def _backends_with_reference():
    return [pytest.param("cpu", "reference", id="reference")] + compiled_backends()


@pytest.mark.parametrize("device,backend", _backends_with_reference())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-k{s[1]}")
@pytest.mark.parametrize("rows", ROWS)
def test_bf16_matches_oracle(device, backend, rows, shape):
    x, w = _inputs(rows, *shape, torch.bfloat16, device)
    _check(x, w, backend, torch.bfloat16)


@pytest.mark.parametrize("device,backend", _backends_with_reference())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_match_oracle(device, backend, dtype):
    x, w = _inputs(3, 17, 130, dtype, device)
    _check(x, w, backend, dtype)


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("lead", [(2, 3), (4, 5)], ids=["6rows-kernel", "20rows-torch"])
def test_leading_dims(device, backend, lead):
    x, w = _inputs(None, 33, 64, torch.bfloat16, device, lead=lead)
    _check(x, w, backend, torch.bfloat16)


@_NEEDS_C
@pytest.mark.parametrize("rows,kernel", [(1, True), (16, True), (17, False), (0, False)])
def test_dispatch_uses_the_kernel_only_for_skinny_bf16(monkeypatch, rows, kernel):
    calls = []

    def spy(backend, name, device, *args, **kw):
        calls.append(name)
        return real_launch(backend, name, device, *args, **kw)

    linear_mod = importlib.import_module("qwen3_fast.ops.linear")  # ops.linear is the function
    real_launch = linear_mod.launch
    monkeypatch.setattr(linear_mod, "launch", spy)
    x, w = _inputs(rows, 9, 40, torch.bfloat16)
    y = ops.linear(x, w)
    assert calls == (["linear"] if kernel else [])
    ref = (x.double() @ w.double().t()).to(torch.bfloat16)
    # one float32 rounding to bf16: at most one bf16 ulp from the correctly rounded result
    assert torch.allclose(y.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    calls.clear()
    ops.linear(x.float(), w.float())  # float32 is torch's job
    assert calls == []


@_NEEDS_C
def test_kernel_matches_torch_bf16_within_one_ulp():
    x, w = _inputs(8, 1000, 1024, torch.bfloat16)
    y = ops.linear(x, w)
    t = torch.nn.functional.linear(x, w)
    # both accumulate in float32 (in different orders) and round once to bf16
    assert torch.allclose(y.float(), t.float(), rtol=2 ** -7, atol=1e-3)


@_NEEDS_C
@pytest.mark.parametrize("args,match", [
    ((0, 8, 8), r"rows m must be in \[1, 16\]"),
    ((17, 8, 8), r"rows m must be in \[1, 16\]"),
    ((1, 0, 8), "out_features n must be > 0"),
    ((1, 8, 0), "in_features k must be > 0"),
])
def test_kernel_rejects_bad_sizes(args, match):
    x = torch.zeros(16 * 8, dtype=torch.bfloat16)
    w = torch.zeros(8 * 8, dtype=torch.bfloat16)
    y = torch.zeros(16 * 8, dtype=torch.bfloat16)
    C = _ext.extension()
    with pytest.raises(ValueError, match=match):
        C.linear_cpu(x.data_ptr(), w.data_ptr(), y.data_ptr(), *args, 1)


def test_float64_gradcheck():
    x, w = _inputs(3, 5, 7, torch.float64)
    assert torch.autograd.gradcheck(ops.linear, (x.requires_grad_(), w.requires_grad_()))


@_NEEDS_C
def test_opcheck_custom_op():
    x, w = _inputs(3, 17, 130, torch.bfloat16)
    torch.library.opcheck(torch.ops.qwen3_fast.linear_fwd.default,
                          (x.requires_grad_(), w.requires_grad_(), "cpu"))


@_NEEDS_C
def test_compile_fullgraph():
    x, w = _inputs(2, 24, 64, torch.bfloat16)

    def f(x, w):
        return ops.linear(x, w).relu()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), f(x, w), rtol=0, atol=0)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.linear(torch.randn(2, 3), torch.randn(4, 5)), ValueError,
     "in_features K = 5"),
    (lambda: ops.linear(torch.randn(2, 3), torch.randn(4, 3).bfloat16()), TypeError,
     "weight has dtype"),
    (lambda: ops.linear(torch.randn(2, 3), torch.randn(3)), ValueError, "weight must be 2-D"),
    (lambda: ops.linear([1.0], torch.randn(4, 3)), TypeError, "x must be a torch.Tensor"),
    (lambda: ops.linear(torch.ones(2, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32)),
     TypeError, "x has dtype"),
])
def test_bad_inputs_are_named(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_weight_streaming_lifts_the_decode_thread_cap(monkeypatch):
    # The engine caps kernels at one thread for small decode steps; a GEMV that streams a
    # large weight keeps torch's thread count (one thread cannot use the memory bandwidth),
    # a small one stays capped.
    import qwen3_fast.ops._kernel_args as ka

    seen = []

    class FakeC:
        def linear_cpu(self, *args):
            seen.append(args[-1])  # the thread count comes last

    monkeypatch.setattr(ka._ext, "extension", lambda: FakeC())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    with ka.cpu_thread_cap(1):
        ka.launch("cpu", "linear", torch.device("cpu"), stream_bytes=ka.UNCAPPED_STREAM_BYTES)
        ka.launch("cpu", "linear", torch.device("cpu"), stream_bytes=ka.UNCAPPED_STREAM_BYTES - 1)
        ka.launch("cpu", "linear", torch.device("cpu"))
    ka.launch("cpu", "linear", torch.device("cpu"))
    assert seen == [4, 1, 1, 4]
