"""cpu_grad_cache (csrc/cpu/zero_slabs.cpp): zero-except-written tensors from recycled pages.

The property that matters: whatever was done to a freed block (in-place ops, writes that
bypass autograd's version counter through numpy), a reused block reads as exact zeros
outside the slabs its new caller writes. Plus the cache bookkeeping, the size cap, the
argument checks and the MoE weight gradients that use it.

    pytest python_tests/ops/test_cpu_grad_cache.py      # a few seconds
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

from qwen3_fast import _ext, ops
from qwen3_fast.ops import cpu_grad_cache as cgc

ext = _ext.extension()
pytestmark = pytest.mark.skipif(not ext.zero_slabs_supported(),
                                reason="recycled zero pages need Linux (mremap)")
PAGE = ext.zero_slabs_page_size()
# 8 slabs of 3 pages each, as bf16 [8, 3 * PAGE / 2]
SHAPE = (8, 3 * PAGE // 2)


@pytest.fixture(autouse=True)
def _small_blocks_recycled(monkeypatch):
    monkeypatch.setattr(cgc, "RECYCLE_MIN_BYTES", 0)
    ops.empty_cpu_grad_cache()
    yield
    gc.collect()
    ops.empty_cpu_grad_cache()


def _nonzero_slabs(t: torch.Tensor) -> list[int]:
    return [e for e in range(t.shape[0]) if bool((t[e].view(torch.int16) != 0).any())]


def test_fresh_block_is_zero_and_writable():
    t = cgc.zeros_except(SHAPE, torch.bfloat16, [1, 4])
    assert t.shape == SHAPE and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert _nonzero_slabs(t) == []
    t[1] = 1.5
    t[4] = -2.0
    assert _nonzero_slabs(t) == [1, 4] and float(t[4, -1]) == -2.0


@pytest.mark.parametrize("first,second", [([1, 4], [0, 4, 6]), ([0, 2, 5, 7], [3]),
                                          ([2], [2]), ([1, 6], [])],
                         ids=["more", "fewer", "same", "none"])
def test_reused_block_is_zero_outside_the_new_slabs_whatever_was_written(first, second):
    before = ops.cpu_grad_cache_stats()
    t = cgc.zeros_except(SHAPE, torch.bfloat16, first)
    for e in first:
        t[e] = 3.0
    t.add_(1.0)  # an in-place op over every slab (bumps the version counter)
    t.view(torch.int16).numpy()[:] = 0x4000  # and writes no version counter sees
    address = t.data_ptr()
    del t
    gc.collect()
    mid = ops.cpu_grad_cache_stats()
    assert mid["cached_blocks"] == before["cached_blocks"] + 1
    assert mid["cached_bytes"] == before["cached_bytes"] + len(first) * 3 * PAGE
    u = cgc.zeros_except(SHAPE, torch.bfloat16, second)
    after = ops.cpu_grad_cache_stats()
    assert after["hits"] == mid["hits"] + 1 and u.data_ptr() == address
    # the written slabs hold leftovers (the caller overwrites them); all else is zero
    assert set(_nonzero_slabs(u)) <= set(second)
    assert all(bool((u[e] == 0).all()) for e in range(SHAPE[0]) if e not in second)
    for e in second:
        u[e] = float(e)
    assert _nonzero_slabs(u) == [e for e in second if e != 0]


@pytest.mark.parametrize("shape", [(0, 3 * PAGE // 2), (4, 0)], ids=["no-slabs", "empty-slabs"])
def test_empty_shapes(shape):
    t = cgc.zeros_except(shape, torch.bfloat16, [])
    assert t.shape == shape and t.numel() == 0


def test_blocks_in_use_are_not_shared_and_sizes_do_not_mix():
    a = cgc.zeros_except(SHAPE, torch.bfloat16, [0])
    b = cgc.zeros_except(SHAPE, torch.bfloat16, [0])
    assert a.data_ptr() != b.data_ptr()
    a[0] = 1.0
    assert bool((b[0] == 0).all())
    del a
    gc.collect()
    other = cgc.zeros_except((4, 3 * PAGE // 2), torch.bfloat16, [1])  # another size: fresh
    assert _nonzero_slabs(other) == []
    assert ops.cpu_grad_cache_stats()["cached_blocks"] == 1


def test_empty_cache_unmaps_cached_blocks_only():
    kept = cgc.zeros_except(SHAPE, torch.bfloat16, [2])
    kept[2] = 5.0
    freed = cgc.zeros_except(SHAPE, torch.bfloat16, [3])
    del freed
    gc.collect()
    assert ops.cpu_grad_cache_stats()["cached_blocks"] == 1
    ops.empty_cpu_grad_cache()
    stats = ops.cpu_grad_cache_stats()
    assert stats["cached_blocks"] == 0 and stats["cached_bytes"] == 0
    assert float(kept[2, 0]) == 5.0  # a block in use is untouched
    del kept
    gc.collect()
    assert ops.cpu_grad_cache_stats()["cached_blocks"] == 1


@pytest.mark.parametrize("setting", ["0", "lots"])
def test_cache_off_by_setting_or_unreadable_setting(setting):
    code = ("import gc, torch\n"
            "from qwen3_fast import _ext\n"
            "x = _ext.extension()\n"
            "p = x.zero_slabs_page_size()\n"
            "t = torch.frombuffer(x.zero_slabs_take(4 * p, p, [1]), dtype=torch.uint8)\n"
            "del t; gc.collect()\n"
            "s = x.zero_slabs_stats()\n"
            "print(s['cap_bytes'], s['cached_blocks'])\n")
    env = dict(os.environ, QWEN3_FAST_CPU_GRAD_CACHE_MB=setting)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "0"]


def test_cap_evicts_least_recently_freed():
    cap = ops.cpu_grad_cache_stats()["cap_bytes"]
    if cap == 0:
        pytest.skip("cache turned off by QWEN3_FAST_CPU_GRAD_CACHE_MB")
    code = ("import gc, torch\n"
            "from qwen3_fast import _ext\n"
            "x = _ext.extension()\n"
            "p = x.zero_slabs_page_size()\n"
            "a, b, c = (torch.frombuffer(x.zero_slabs_take(n * 256 * p, 256 * p, list(range(n))),\n"
            "                            dtype=torch.uint8) for n in (1, 2, 3))\n"
            "del a; del b; del c; gc.collect()\n"  # freed in this order: 1, 2, 3 slabs
            "s = x.zero_slabs_stats()\n"
            "print(s['cached_blocks'], s['cached_bytes'] // (256 * p))\n")
    env = dict(os.environ, QWEN3_FAST_CPU_GRAD_CACHE_MB=str(PAGE // 1024))  # 4 slabs of 256 pages
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "3"]  # the 3-slab block was freed last; the others did not fit with it


@pytest.mark.parametrize("nbytes,slab,written,match", [
    (4 * 4096, 100, [0], "slab must be a positive multiple of the page size"),
    (5 * PAGE, 2 * PAGE, [0], "nbytes must be a positive multiple of slab"),
    (0, PAGE, [], "nbytes must be a positive multiple of slab"),
    (4 * PAGE, PAGE, [2, 1], "written must be strictly increasing"),
    (4 * PAGE, PAGE, [1, 1], "written must be strictly increasing"),
    (4 * PAGE, PAGE, [4], r"slab indices in \[0, 4\)"),
    (4 * PAGE, PAGE, [-1], r"slab indices in \[0, 4\)"),
])
def test_bad_arguments_are_named(nbytes, slab, written, match):
    with pytest.raises(ValueError, match=match):
        ext.zero_slabs_take(nbytes, slab, written)


@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_weight_gradients_over_steps_with_changing_experts(trans_b):
    # [E, 64, 64] bf16: 8 KB slabs (page multiples) go through the cache; each step routes to
    # other experts, so a reused block must drop the last step's experts to zeros.
    gg = sys.modules["qwen3_fast.ops.grouped_gemm"]
    e, k, n = 6, 64, 64
    g = torch.Generator().manual_seed(0)
    for sizes in ([0, 3, 0, 0, 2, 0], [4, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 5], [1] * 6):
        offsets = torch.tensor([0] + sizes).cumsum(0)
        a = torch.randn(sum(sizes), k, generator=g).to(torch.bfloat16)
        dc = torch.randn(sum(sizes), n, generator=g).to(torch.bfloat16)
        db = gg.grouped_gemm_wgrad(a, dc, offsets, trans_b, e, "cpu")
        for x in range(e):
            lo, hi = int(offsets[x]), int(offsets[x + 1])
            ref = (dc[lo:hi].t() @ a[lo:hi]) if trans_b else (a[lo:hi].t() @ dc[lo:hi])
            torch.testing.assert_close(db[x], ref.reshape(db[x].shape) if hi > lo
                                       else torch.zeros_like(db[x]), atol=0, rtol=0)
        del db
        gc.collect()
    assert ops.cpu_grad_cache_stats()["hits"] >= 3


def test_moe_expert_gradients_accumulate_and_recycle():
    # p.grad accumulation (micro-batches) and zero_grad(set_to_none) around the cache:
    # each step's weight gradients equal the reference block's.
    e, h, inter, k = 4, 64, 32, 2  # gate_up slab [64, 64] bf16 = 8 KB, down [64, 32] = 4 KB
    g = torch.Generator().manual_seed(1)
    w_gu = (torch.randn(e, 2 * inter, h, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    w_dn = (torch.randn(e, h, inter, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    ref_gu = w_gu.detach().clone().requires_grad_()
    ref_dn = w_dn.detach().clone().requires_grad_()
    for step in range(3):
        for _micro in range(2):
            x = torch.randn(3, h, generator=g).to(torch.bfloat16)
            logits = torch.randn(3, e, generator=g)
            logits[:, step % e] += 10  # a different favourite expert per step
            ops.moe_experts(x, logits, w_gu, w_dn, k, True).float().sum().backward()
            with ops.use_backend("reference"):
                ops.moe_experts(x, logits, ref_gu, ref_dn, k, True).float().sum().backward()
        torch.testing.assert_close(w_gu.grad, ref_gu.grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(w_dn.grad, ref_dn.grad, atol=2e-2, rtol=2e-2)
        for p in (w_gu, w_dn, ref_gu, ref_dn):
            p.grad = None
        gc.collect()
    assert ops.cpu_grad_cache_stats()["hits"] > 0
