"""Recycled zero pages for the large CPU weight gradients of the MoE experts.

The gradient of a stacked expert weight ([E, N, K]: 1.2 GB for a Qwen3-30B-A3B layer's
gate_up in bf16) is zero except for the experts that received tokens. :func:`zeros_except`
returns such a tensor with only the written experts' slabs undefined (the caller fills
them), backed by csrc/cpu/zero_slabs.cpp: fresh mappings give the zeros without writing
them, and a block freed by its last tensor is cached and its populated pages are moved
(page tables only) onto the next call's written slabs, so the weight-gradient GEMMs write
into pages that are already mapped instead of faulting in fresh ones (measured on the CI
VM, 8 of 128 experts: 62 ms -> 2.9 ms). Everything outside the written slabs is reset to
zero pages on reuse, whatever was done to the previous tensor.

The cache holds at most ``QWEN3_FAST_CPU_GRAD_CACHE_MB`` MB of populated pages (default:
an eighth of the physical memory; 0 turns it off). Like torch's CUDA caching allocator it
keeps memory the process freed: :func:`empty_cpu_grad_cache` returns it to the OS.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qwen3_fast import _ext

# Below this size a gradient comes from torch.zeros (page faults are negligible there).
RECYCLE_MIN_BYTES = 32 << 20


def zeros_except(shape: tuple[int, ...], dtype: torch.dtype, written: list[int]) -> Tensor:
    """A contiguous CPU tensor of ``shape``, zero except ``t[e]`` for e in ``written``.

    Parameters
    ----------
    shape : tuple of int
        ``(E, ...)``: E slabs along the first dimension.
    dtype : torch.dtype
    written : list of int
        Strictly increasing slab indices in ``[0, E)`` whose contents are undefined: the
        caller must overwrite every element of them.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or nbytes < RECYCLE_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    ext = _ext.extension()
    slab = nbytes // shape[0]
    if ext.zero_slabs_supported() and slab % ext.zero_slabs_page_size() == 0:
        block = ext.zero_slabs_take(nbytes, slab, written)
        # frombuffer holds the block until the storage dies, which returns it to the cache
        return torch.frombuffer(block, dtype=torch.uint8).view(dtype).view(shape)
    # slabs that are not page multiples, or no mremap: numpy's zeros is calloc, which for
    # large blocks maps zero pages without writing them (only written slabs fault in)
    import numpy as np

    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def cpu_grad_cache_stats() -> dict[str, int]:
    """``hits`` / ``misses`` (gradients served by a cached block / a fresh mapping),
    ``cached_blocks``, ``cached_bytes`` (populated pages held) and ``cap_bytes``."""
    return dict(_ext.extension().zero_slabs_stats())


def empty_cpu_grad_cache() -> None:
    """Unmap every cached gradient block (gradients still in use are not affected)."""
    _ext.extension().zero_slabs_empty_cache()
