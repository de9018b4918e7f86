"""Measured memory bandwidth, the denominator of every "fraction of bandwidth" figure.

CPU: the best of a STREAM-style copy of 512 MiB with ``Tensor.copy_`` at torch's thread
count (bytes read plus bytes written) and a read-only ``sum`` over the same 512 MiB, best of
7 runs each. The read-only figure is there because a decode step only reads: on this VM a
copy (whose writes also cost a read for ownership) can report less than a plain read
delivers. CUDA: a device-to-device copy of 2 GiB, synchronized.

The VM's bandwidth drifts by tens of percent over minutes, so a run measured once at its
start could show kernels above 100%; summaries call ``measure_bandwidth(device, again=True)``
at the end, which measures once more and keeps the better figure.
"""
from __future__ import annotations

import time

import torch

MEASURED: dict[str, float] = {}


def _best(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])  # STREAM reports the best run: the machine's capability


def measure_bandwidth(device: str = "cpu", repeats: int = 7, again: bool = False) -> float:
    """Bytes per second of memory traffic (see the module docstring), cached per device;
    `again` measures once more and keeps the larger figure."""
    if device in MEASURED and not again:
        return MEASURED[device]
    nbytes = (2 if device == "cuda" else 0.5) * 2**30
    src = torch.ones(int(nbytes) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = 2 * nbytes / _best(lambda: dst.copy_(src), repeats, device)
    if device == "cpu":
        best = max(best, nbytes / _best(src.sum, repeats, device))
    MEASURED[device] = max(best, MEASURED.get(device, 0.0))
    return MEASURED[device]
