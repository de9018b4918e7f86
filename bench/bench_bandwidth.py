"""Memory bandwidth of this machine (the denominator of every "fraction of bandwidth").

The denominator is bench/_bandwidth.py's: the best of a 512 MiB copy (bytes read plus
bytes written) and a read-only sum. This benchmark times the copy itself with
``Tensor.copy_`` at torch's thread count. Run: ``pytest bench/bench_bandwidth.py
--benchmark-only``.
"""
from __future__ import annotations

import torch

from _bandwidth import measure_bandwidth


def test_copy_bandwidth(benchmark):
    bw = measure_bandwidth("cpu")
    src = torch.ones(128 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    benchmark.group = "bandwidth"
    benchmark.extra_info.update(impl="copy_", device="cpu", bytes=2 * src.numel() * 4,
                                bandwidth_gbs=bw / 1e9)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=7, warmup_rounds=1)
