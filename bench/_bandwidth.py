"""Measured memory bandwidth, the denominator of every "fraction of bandwidth" figure.

CPU: a STREAM-style copy of 512 MiB with ``Tensor.copy_`` at torch's thread count, bytes
read plus bytes written over the best of 7 runs. CUDA: the same with a device-to-device
copy of 2 GiB, synchronized.
"""
from __future__ import annotations

import time

import torch

MEASURED: dict[str, float] = {}


def measure_bandwidth(device: str = "cpu", repeats: int = 7) -> float:
    """Bytes per second of a large copy (read + write counted), best of `repeats`."""
    if device in MEASURED:
        return MEASURED[device]
    nbytes = (2 if device == "cuda" else 0.5) * 2**30
    src = torch.ones(int(nbytes) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # STREAM reports the best run: the machine's capability, not its noise.
    MEASURED[device] = 2 * nbytes / min(times[1:])
    return MEASURED[device]
