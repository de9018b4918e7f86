"""grouped_gemm's ``cutlass`` backend (csrc/cuda/grouped_gemm_sm90.cu, CUTLASS 3.x ptr-array
grouped GEMM for sm_90a): against a float64 per-expert loop, forward and both gradients,
E in {1, 8, 128}, empty groups, M from 1 to 4096, trans_b both ways, float16/bfloat16; no
host synchronization (sync debug mode and CUDA graph capture). The GPU tests need a
compute capability 9.0 GPU and a build with 90a in QWEN3_FAST_CUDA_ARCHS (bench/gpu_check.sh
builds that); the backend-selection tests run anywhere.

    pytest python_tests/ops/test_grouped_gemm_sm90.py     # CPU: < 5 s (GPU tests skip)
"""
from __future__ import annotations

import importlib

import pytest
import torch

from qwen3_fast import ops

# the module (qwen3_fast.ops re-exports the function under the same name)
gg = importlib.import_module("qwen3_fast.ops.grouped_gemm")

from conftest import assert_close_to_oracle, grouped_gemm_oracle


def _sm90_ready() -> bool:
    return (torch.cuda.is_available() and gg.sm90_kernel_built()
            and torch.cuda.get_device_capability() == (9, 0))


SM90 = pytest.mark.skipif(not _sm90_ready(), reason="needs a compute capability 9.0 GPU and "
                          "a build with the sm_90a CUTLASS kernel")


def _sizes(e: int, m: int, empty: int, seed: int) -> list[int]:
    """m rows over e groups, `empty` of them (spread out) with none; random otherwise."""
    g = torch.Generator().manual_seed(seed)
    empty_ids = set(torch.randperm(e, generator=g)[:empty].tolist())
    live = [i for i in range(e) if i not in empty_ids]
    counts = [0] * e
    if live:
        picks = torch.randint(0, len(live), (m,), generator=g)
        for i, c in enumerate(torch.bincount(picks, minlength=len(live)).tolist()):
            counts[live[i]] = c
    return counts


def _inputs(sizes, k, n, trans_b, dtype, pad=(0, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes) + pad[0] + pad[1]
    offsets = torch.tensor([pad[0]] + sizes, dtype=torch.int64).cumsum(0).cuda()
    a = torch.randn(m, k, generator=g).to("cuda", dtype)
    shape = (len(sizes), n, k) if trans_b else (len(sizes), k, n)
    b = (torch.randn(shape, generator=g) / k ** 0.5).to("cuda", dtype)
    return a, b, offsets


def _dirty_allocator(*shapes, dtype):
    # Freed NaN blocks of the outputs' sizes: the caching allocator hands them out again,
    # so an output element the kernel forgets to write shows up as NaN, not as a lucky 0.
    blocks = [torch.full(s, float("nan"), dtype=dtype, device="cuda") for s in shapes]
    del blocks


def _check(a, b, offsets, trans_b, backend="cutlass"):
    dtype = a.dtype
    n = b.shape[1] if trans_b else b.shape[2]
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    _dirty_allocator((a.shape[0], n), tuple(a.shape), tuple(b.shape), dtype=dtype)
    c = ops.grouped_gemm(a, b, offsets, trans_b=trans_b, backend=backend)
    dc = torch.randn_like(c)
    da, db = torch.autograd.grad(c, (a, b), dc)
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    c64 = grouped_gemm_oracle(a64, b64, offsets, trans_b)
    da64, db64 = torch.autograd.grad(c64, (a64, b64), dc.double())
    assert c.dtype == da.dtype == db.dtype == dtype
    scale = max(1.0, a.shape[1] / 256)  # fp32 accumulation, bf16/fp16 rounding of outputs
    # compared on the GPU: the large cases would take seconds on the host
    assert_close_to_oracle(c, c64, dtype, scale=scale, name="c")
    assert_close_to_oracle(da, da64, dtype, scale=scale, name="da")
    rows = max(1, a.shape[0] // b.shape[0])
    assert_close_to_oracle(db, db64, dtype, scale=max(scale, rows / 256), name="db")
    lo, hi = offsets[0].item(), offsets[-1].item()
    assert torch.all(c[:lo] == 0) and torch.all(c[hi:] == 0)


# (name, group sizes): E = 1, 8, 128; M from 1 to 4096; empty groups first/middle/last.
# Average rows per group <= 64 selects the Pingpong kernel, more the Cooperative one: both
# run here for both layouts and dtypes (e1-m1, e128-*: Pingpong; e1-m4096, e8-mixed: Coop.)
CASES = {
    "e1-m1": [1],
    "e1-m4096": [4096],
    "e8-mixed": [0, 1, 7, 128, 0, 300, 1000, 0],
    "e128-m4096": _sizes(128, 4096, empty=20, seed=1),
    "e128-m130": _sizes(128, 130, empty=30, seed=2),
}


@pytest.mark.cuda
@SM90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cutlass_matches_per_expert_loop(case, trans_b, dtype):
    # K 136, N 264: multiples of 8 (TMA) but not of the 64/128 tiles: partial K and N tiles
    a, b, offsets = _inputs(CASES[case], 136, 264, trans_b, dtype)
    _check(a, b, offsets, trans_b)


@pytest.mark.cuda
@SM90
@pytest.mark.parametrize("rows,trans_b", [(4096, False), (4096, True), (32768, True)],
                         ids=["T512-nn", "T512-nt", "T4096-nt"])
@pytest.mark.parametrize("kn", [(2048, 1536), (768, 2048)], ids=["gate_up", "down"])
def test_cutlass_qwen3_30b_a3b_shapes(kn, rows, trans_b):
    """Qwen3-30B-A3B expert GEMMs (E 128) at 512 and 4096 tokens x top-8: 32 rows per
    expert on average (the 64-row Pingpong kernel) and 256 (the 128-row Cooperative one)."""
    a, b, offsets = _inputs(_sizes(128, rows, empty=5, seed=3), kn[0], kn[1], trans_b,
                            torch.bfloat16)
    _check(a, b, offsets, trans_b)


@pytest.mark.cuda
@SM90
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_cutlass_rows_outside_every_group_are_zero(trans_b):
    a, b, offsets = _inputs([5, 0, 70], 64, 48, trans_b, torch.bfloat16, pad=(3, 9))
    _check(a, b, offsets, trans_b)


@pytest.mark.cuda
@SM90
def test_cutlass_never_synchronizes_with_the_host():
    a, b, offsets = _inputs(_sizes(8, 300, empty=2, seed=4), 64, 128, True, torch.bfloat16)
    a.requires_grad_()
    b.requires_grad_()
    ops.grouped_gemm(a, b, offsets, trans_b=True, backend="cutlass").sum().backward()  # warm-up
    torch.cuda.synchronize()
    # 1) torch's own syncs (.item(), .tolist(), nonzero, ...) anywhere on the path raise
    torch.cuda.set_sync_debug_mode("error")
    try:
        c = ops.grouped_gemm(a, b, offsets, trans_b=True, backend="cutlass")
        c.backward(torch.ones_like(c))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # 2) syncs inside the extension (cudaMemcpy, stream/device synchronize) break capture
    a0 = a.detach()
    eager = ops.grouped_gemm(a0, b.detach(), offsets, trans_b=True, backend="cutlass")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.grouped_gemm(a0, b.detach(), offsets, trans_b=True, backend="cutlass")
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.cuda
@SM90
def test_cuda_backend_uses_cutlass_only_when_asked(monkeypatch):
    calls = []
    real = gg._cutlass_grouped_gemm
    monkeypatch.setattr(gg, "_cutlass_grouped_gemm", lambda *args: (calls.append(1), real(*args)))
    a, b, offsets = _inputs([3, 0, 9], 32, 24, False, torch.bfloat16)
    monkeypatch.setenv("QWEN3_FAST_GROUPED_GEMM", "tiled")
    tiled = ops.grouped_gemm(a, b, offsets, backend="cuda")
    assert calls == []
    monkeypatch.setenv("QWEN3_FAST_GROUPED_GEMM", "cutlass")
    cut = ops.grouped_gemm(a, b, offsets, backend="cuda")
    assert calls == [1]
    assert_close_to_oracle(cut.cpu(), tiled.double().cpu(), torch.bfloat16, name="c")
    # K = 12 is no multiple of 8: the cuda backend falls back to the tiled kernel ...
    a, b, offsets = _inputs([3, 0, 9], 12, 24, False, torch.bfloat16)
    ops.grouped_gemm(a, b, offsets, backend="cuda")
    assert calls == [1]
    # ... while an explicit cutlass request says why it cannot run
    with pytest.raises(ValueError, match=r"backend='cutlass' cannot run here: .*multiples of 8"):
        ops.grouped_gemm(a, b, offsets, backend="cutlass")
    with pytest.raises(ValueError, match=r"backend='cutlass'.*float16 or bfloat16"):
        ops.grouped_gemm(a.float(), b.float(), offsets, backend="cutlass")


# ------------------------------------------------------------------ anywhere (CPU)
def _cpu_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(7, 8, generator=g), torch.randn(3, 8, 16, generator=g),
            torch.tensor([0, 2, 2, 7]))


def test_explicit_cutlass_on_cpu_tensors_is_refused_by_name():
    a, b, offsets = _cpu_inputs()
    with pytest.raises(ValueError, match=r"backend='cutlass' cannot run here: it needs CUDA"):
        ops.grouped_gemm(a, b, offsets, backend="cutlass")


@pytest.mark.parametrize("bad", ["cutlas", "CUDA", 3])
def test_unknown_backend_names_are_refused(bad):
    a, b, offsets = _cpu_inputs()
    with pytest.raises(ValueError, match=r"backend must be None or one of .*cutlass"):
        ops.grouped_gemm(a, b, offsets, backend=bad)


def test_explicit_gpu_backend_on_cpu_tensors_is_refused():
    a, b, offsets = _cpu_inputs()
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run here: .*CUDA tensors"):
        ops.grouped_gemm(a, b, offsets, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_explicit_cpu_backends_match_the_default(backend):
    a, b, offsets = _cpu_inputs()
    want = ops.grouped_gemm(a, b, offsets)
    got = ops.grouped_gemm(a, b, offsets, backend=backend)
    torch.testing.assert_close(got, want)


def test_cuda_kernel_choice_follows_the_environment(monkeypatch):
    monkeypatch.delenv("QWEN3_FAST_GROUPED_GEMM", raising=False)
    # verified on the 2026-11-29 H200 run: the cuda backend takes CUTLASS where it applies
    assert "cutlass" in gg._backend.GPU_VERIFIED["grouped_gemm"]
    assert gg._cuda_kernel_is_cutlass() is True
    monkeypatch.setattr(gg._backend, "GPU_VERIFIED", {"grouped_gemm": ("cuda",)})
    assert gg._cuda_kernel_is_cutlass() is False  # not GPU-verified: the tiled kernel
    monkeypatch.setattr(gg._backend, "GPU_VERIFIED", {"grouped_gemm": ("cutlass", "cuda")})
    assert gg._cuda_kernel_is_cutlass() is True
    monkeypatch.setenv("QWEN3_FAST_GROUPED_GEMM", "tiled")
    assert gg._cuda_kernel_is_cutlass() is False
    monkeypatch.setenv("QWEN3_FAST_GROUPED_GEMM", "cutlass")
    assert gg._cuda_kernel_is_cutlass() is True
    monkeypatch.setenv("QWEN3_FAST_GROUPED_GEMM", "cutless")
    with pytest.raises(ValueError, match="QWEN3_FAST_GROUPED_GEMM='cutless'"):
        gg._cuda_kernel_is_cutlass()


def test_cutlass_usable_explains_cpu_tensors():
    a, b, _ = _cpu_inputs()
    ok, why = gg.cutlass_usable(a, b, False)
    assert not ok and "CUDA tensors" in why


def test_info_reports_the_sm90_kernel():
    import qwen3_fast

    info = qwen3_fast.build_info()
    assert info["grouped_gemm_sm90"] == gg.sm90_kernel_built()
    if info["grouped_gemm_sm90"]:  # only a CUDA build with CUTLASS and 90a has it
        assert info["cuda_kernels_built"] and info["cutlass_in_build"]
        assert any(arch.startswith("90a") for arch in info["cuda_archs"])
