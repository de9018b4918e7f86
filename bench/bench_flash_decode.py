"""flash_decode on the CPU: precision 16 (dense bf16 cache), 8 and 4 (hierarchical cache)
against torch SDPA over the bf16 cache (what users run today: one decode query, GQA via
``enable_gqa``), Qwen3 attention shapes Hq/Hkv 32/8, D 128, contexts 4K/16K/32K (and 1K, the
CI smoke case), batch 1/8.

Run: ``pytest bench/bench_flash_decode.py --benchmark-only -s`` (prints a ratio table and
writes bench/results/flash_decode_cpu.md). Bytes counted per call: the cache bytes each
implementation must read, B * context * bytes_per_token (dense 4096 B per token per
layer; 8-bit codes + scales 2112 B; 4-bit 1088 B) plus, for 8/4, the buffered tokens;
the fraction is of the measured memory bandwidth (bench/_bandwidth.py).
Memory per token is the cache's storage: 8-bit with scales is 2112 / 4096 = 0.516x bf16.
Caches are filled with random contents directly (quantization cost is not timed here).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

from qwen3_fast import ops
from qwen3_fast.cache import DenseKVCache, HierarchicalKVCache

from _bandwidth import measure_bandwidth

HQ, HKV, D, G = 32, 8, 128, 128
CONTEXTS = [4096, 16384, 32768]
BATCHES = [1, 8]
IMPLS = ["sdpa_bf16", "flash_decode_16", "flash_decode_8", "flash_decode_4"]
RESULTS: dict = {}
_CACHES: dict = {}


def _caches(batch: int, ctx: int):
    key = (batch, ctx)
    if key not in _CACHES:
        _CACHES.clear()
        dense = DenseKVCache(1, batch, HKV, D, ctx, torch.bfloat16)
        for t in (dense.k, dense.v):
            for b in range(batch):
                t[0, b].normal_()
        hier = HierarchicalKVCache(1, batch, HKV, D, ctx, torch.bfloat16, group_size=G)
        for t in (hier.k_u, hier.k_l, hier.v_u, hier.v_l):
            t.random_(0, 256)
        for t in (hier.k_min, hier.v_min, hier.k_buf, hier.v_buf):
            t.normal_()
        for t in (hier.k_scale, hier.v_scale):
            t.uniform_(0.01, 0.1)
        for c in (dense, hier):
            c.begin_step(ctx)  # contents are random already: reserve without writing
        _CACHES[key] = (dense, hier)
    return _CACHES[key]


def _bytes(impl: str, batch: int, ctx: int, hier: HierarchicalKVCache) -> float:
    if impl in ("sdpa_bf16", "flash_decode_16"):
        return batch * ctx * 2 * HKV * D * 2
    bits = int(impl.rsplit("_", 1)[1])
    nq = hier.quantized_lengths()[0]
    return batch * (nq * hier.bytes_per_token(bits) + (ctx - nq) * 2 * HKV * D * 2)


# ids read "cpu-<impl>-<batch>-<ctx>-ctx": CI's smoke filter (-1-1024-) picks the small case
@pytest.mark.parametrize("ctx", [1024] + CONTEXTS, ids=lambda c: f"{c}-ctx")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", ["cpu"])
def test_flash_decode(benchmark, device, impl, batch, ctx):
    dense, hier = _caches(batch, ctx)
    q = torch.randn(batch, HQ, 1, D).to(torch.bfloat16)
    if impl == "sdpa_bf16":
        k, v = dense.k[0], dense.v[0]
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    else:
        prec = int(impl.rsplit("_", 1)[1])
        cache = dense if prec == 16 else hier
        fn = lambda: ops.flash_decode(q, cache, 0, prec)  # noqa: E731
    benchmark.group = f"cpu-flash_decode-T{ctx}-B{batch}"
    nbytes = _bytes(impl, batch, ctx, hier)
    benchmark.extra_info.update(impl=impl, device="cpu", bytes=nbytes,
                                bandwidth=measure_bandwidth("cpu"))
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke)
        RESULTS[(ctx, batch, impl)] = (benchmark.stats.stats.median, nbytes)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not RESULTS:
        return
    bw = measure_bandwidth("cpu")
    dense_bpt = 2 * HKV * D * 2
    hier = HierarchicalKVCache(1, 1, HKV, D, G, torch.bfloat16, group_size=G)
    lines = [f"flash_decode CPU, Hq/Hkv {HQ}/{HKV}, D {D}, G {G}, bf16, "
             f"{torch.get_num_threads()} threads, memory bandwidth {bw / 1e9:.1f} GB/s "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             f"memory per token per layer: bf16 {dense_bpt} B; 8-bit+scales "
             f"{hier.bytes_per_token(8):.0f} B ({hier.bytes_per_token(8) / dense_bpt:.3f}x); "
             f"4-bit view reads {hier.bytes_per_token(4):.0f} B "
             f"({hier.bytes_per_token(4) / dense_bpt:.3f}x)", "",
             "| context | batch | impl | median ms | vs SDPA | bytes/token read | of BW |",
             "|---|---|---|---|---|---|---|"]
    for ctx in [1024] + CONTEXTS:
        for batch in BATCHES:
            base = RESULTS.get((ctx, batch, "sdpa_bf16"), (None,))[0]
            for impl in IMPLS:
                if (ctx, batch, impl) not in RESULTS:
                    continue
                t, nbytes = RESULTS[(ctx, batch, impl)]
                ratio = f"{base / t:.2f}x" if base else "-"
                lines.append(f"| {ctx} | {batch} | {impl} | {t * 1e3:.2f} | {ratio} | "
                             f"{nbytes / (batch * ctx):.0f} | {nbytes / t / bw:.0%} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = os.path.join(os.path.dirname(__file__), "results", "flash_decode_cpu.md")
    with open(out, "a") as f:
        f.write(text + "\n\n")
