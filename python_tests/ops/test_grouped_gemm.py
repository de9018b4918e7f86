"""grouped_gemm: every backend (CPU per-group matmul, CUDA, Triton compiled on a GPU and
interpreted on the CPU) against a per-expert loop, forward and both gradients, with empty
groups, rows outside every group, and trans_b both ways; bad inputs named.

    pytest python_tests/ops/test_grouped_gemm.py        # about 10 s on 2 CPU cores
"""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from qwen3_fast import ops

from conftest import (assert_close_to_oracle, compiled_backends, grouped_gemm_oracle,
                      require_interpreted_triton)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (group sizes, K, N): empty groups first, last and in the middle; one group; odd sizes
GROUPS = [([3, 0, 5, 1], 7, 9), ([0, 0, 4], 16, 8), ([1], 5, 3), ([70, 0, 2, 0], 33, 65)]


def _inputs(sizes, k, n, trans_b, dtype, device, pad=(0, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes) + pad[0] + pad[1]
    e = len(sizes)
    offsets = torch.tensor([pad[0]] + sizes, dtype=torch.int64).cumsum(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = (torch.randn(e, n, k, generator=g) if trans_b else torch.randn(e, k, n, generator=g))
    return a, b.to(device, dtype), offsets.to(device)


def _check(a, b, offsets, trans_b, dtype, backend):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    with ops.use_backend(backend):
        c = ops.grouped_gemm(a, b, offsets, trans_b=trans_b)
        dc = torch.randn_like(c)
        da, db = torch.autograd.grad(c, (a, b), dc)
    a64 = a.detach().cpu().double().requires_grad_()
    b64 = b.detach().cpu().double().requires_grad_()
    c64 = grouped_gemm_oracle(a64, b64, offsets.cpu(), trans_b)
    da64, db64 = torch.autograd.grad(c64, (a64, b64), dc.cpu().double())
    assert c.dtype == dtype and da.dtype == dtype and db.dtype == dtype
    k = a.shape[1]
    scale = max(1.0, k / 16)  # fp32 accumulation error grows with the reduction length
    assert_close_to_oracle(c.cpu(), c64, dtype, scale=scale, name="c")
    assert_close_to_oracle(da.cpu(), da64, dtype, scale=scale, name="da")
    assert_close_to_oracle(db.cpu(), db64, dtype, scale=4 * scale, name="db")
    assert torch.all(c.cpu()[:offsets[0]] == 0) and torch.all(c.cpu()[offsets[-1]:] == 0)


def _backends_with_reference():
    return [pytest.param("cpu", "reference", id="reference")] + compiled_backends()


@pytest.mark.parametrize("device,backend", _backends_with_reference())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
@pytest.mark.parametrize("groups", GROUPS, ids=lambda g: "x".join(map(str, g[0])) + f"-k{g[1]}-n{g[2]}")
def test_grouped_gemm_matches_per_expert_loop(device, backend, dtype, trans_b, groups):
    sizes, k, n = groups
    a, b, offsets = _inputs(sizes, k, n, trans_b, dtype, device)
    _check(a, b, offsets, trans_b, dtype, backend)


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_rows_outside_every_group_are_zero(device, backend, trans_b):
    a, b, offsets = _inputs([2, 0, 3], 6, 5, trans_b, torch.float32, device, pad=(2, 3))
    _check(a, b, offsets, trans_b, torch.float32, backend)


@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
@pytest.mark.parametrize("k", [5, 67, 256])
@pytest.mark.parametrize("n", [3, 40, 130])
@pytest.mark.parametrize("sizes", [[1, 0, 4, 2, 0, 0, 3, 0, 6, 0, 0, 0], [9, 0, 1, 2], [2],
                                   [0, 3, 0]],
                         ids=["rows1-6", "rows9", "one-group", "one-of-two"])
def test_cpu_small_group_kernels(sizes, n, k, trans_b):
    # With few rows per group on average (MoE decode and small batches) the bf16 CPU path
    # runs csrc/cpu/grouped_gemm.cpp's NN kernel (the forward when not trans_b, da when
    # trans_b), which streams groups of <= 4 rows (column chunks split across threads when
    # groups are few) and tiles bigger ones (vdpbf16ps on row pairs: odd k leaves a single
    # row), and grouped_wgrad_small_bf16 for the weight
    # gradient of groups of <= 4 rows (bigger ones: torch.matmul). k tails of the 4-row
    # unroll, n tails of the 16-column vectors.
    gg = importlib.import_module("qwen3_fast.ops.grouped_gemm")
    if not gg._nt_bf16_kernel():
        pytest.skip("needs the AVX512-BF16 CPU kernels")
    assert sum(sizes) <= gg.NN_KERNEL_ROWS_PER_GROUP * len(sizes)  # the kernel takes it
    a, b, offsets = _inputs(sizes, k, n, trans_b, torch.bfloat16, "cpu")
    _check(a, b, offsets, trans_b, torch.bfloat16, "cpu")


@pytest.mark.parametrize("k,n", [(37, 21), (2056, 2800)], ids=["small", "streamed"])
def test_cpu_wgrad_one_row_groups_round_like_torch(k, n):
    # A one-row group's weight gradient is an outer product: each element one float32
    # product rounded to bf16 (nearest even), so it must equal torch's bit for bit,
    # including huge and tiny (denormal) values; NaN stays NaN (its payload may differ).
    # "streamed": 3 x 2800 x 2056 x 2 bytes >= 32 MB takes the streaming stores (with a
    # misaligned row start every other row: 2056 * 2 bytes is not a multiple of 32).
    gg = importlib.import_module("qwen3_fast.ops.grouped_gemm")
    if not gg._nt_bf16_kernel():
        pytest.skip("needs the AVX512-BF16 CPU kernels")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, k, generator=g)
    a[0, :4] = torch.tensor([1e30, 3e-39, float("nan"), -0.0])
    dc = torch.randn(3, n, generator=g)
    dc[1, 0] = 1e-10
    a, dc = a.to(torch.bfloat16), dc.to(torch.bfloat16)
    offsets = torch.tensor([0, 1, 1, 2, 3])
    db = gg.grouped_gemm_wgrad(a, dc, offsets, True, 4, "cpu")
    for e, row in ((0, 0), (2, 1), (3, 2)):
        ref = (dc[row].float()[:, None] * a[row].float()[None, :]).to(torch.bfloat16)
        nan = ref.isnan()
        assert torch.equal(db[e].isnan(), nan), e
        assert torch.equal(db[e][~nan].view(torch.int16), ref[~nan].view(torch.int16)), e
    assert torch.all(db[1] == 0)


@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_cpu_weight_gradient_from_untouched_zero_pages(monkeypatch, trans_b):
    # Large CPU weight gradients come from zero pages and only non-empty groups are written
    # (cpu_grad_cache.zeros_except; slabs that are not page multiples take calloc'd pages,
    # test_cpu_grad_cache.py covers the recycled ones). Force that path on a small case:
    # empty groups must still read as exact zeros.
    from qwen3_fast.ops import cpu_grad_cache

    gg = importlib.import_module("qwen3_fast.ops.grouped_gemm")
    monkeypatch.setattr(cpu_grad_cache, "RECYCLE_MIN_BYTES", 0)
    a, b, offsets = _inputs([0, 3, 0, 0, 2, 0], 8, 6, trans_b, torch.bfloat16, "cpu")
    _check(a, b, offsets, trans_b, torch.bfloat16, "cpu")
    db = gg._grouped_gemm_wgrad(a, torch.randn(a.shape[0], 6, dtype=torch.bfloat16), offsets,
                                trans_b, 6, "cpu")
    assert db.is_contiguous() and db.shape == ((6, 6, 8) if trans_b else (6, 8, 6))
    assert torch.all(db[[0, 2, 3, 5]] == 0) and bool((db[1] != 0).any())


def test_float64_gradcheck():
    a, b, offsets = _inputs([2, 0, 3], 4, 3, True, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_gemm(a, b, offsets, trans_b=True),
                                    (a.requires_grad_(), b.requires_grad_()))


def test_opcheck_custom_ops():
    a, b, offsets = _inputs([2, 0, 3], 4, 3, False, torch.float32, "cpu")
    q = torch.ops.qwen3_fast
    torch.library.opcheck(q.grouped_gemm_fwd.default,
                          (a.requires_grad_(), b.requires_grad_(), offsets, False, "cpu"))
    torch.library.opcheck(q.grouped_gemm_wgrad.default,
                          (a.detach(), torch.randn(5, 3), offsets, False, 3, "cpu"))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5),
                              torch.tensor([0, 3, 2])), ValueError, "offsets must be non-decreasing"),
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5),
                              torch.tensor([0, 2, 3, 4])), ValueError, "expected E\\+1 = 3"),
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5),
                              torch.tensor([0, 2, 5])), ValueError, r"values must lie in \[0, 4\]"),
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5).bfloat16(),
                              torch.tensor([0, 2, 4])), TypeError, "b has dtype"),
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5),
                              torch.tensor([0, 2, 4], dtype=torch.int32)), TypeError, "offsets has dtype"),
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(2, 3, 5),
                              torch.tensor([0, 2, 4]), trans_b=True), ValueError, "reduction size K = 3"),
    (lambda: ops.grouped_gemm(torch.randn(4, 3), torch.randn(3, 5),
                              torch.tensor([0, 2, 4])), ValueError, "b must be 3-D"),
])
def test_bad_inputs_are_named(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


# ------------------------------------------------------------------ Triton (interpreter)
@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_triton_interpreted_matches_loop(dtype, trans_b):
    require_interpreted_triton({"qwen3_fast.ops.triton.grouped_gemm": "_grouped_gemm_kernel"})
    # 70 rows in group 0: two row tiles; K 40 and N 65: partial K and N tiles
    a, b, offsets = _inputs([70, 0, 3, 0], 40, 65, trans_b, dtype, "cpu", pad=(1, 2))
    _check(a, b, offsets, trans_b, dtype, "triton")
