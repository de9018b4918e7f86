"""Turning tensors into the raw arguments of qwen3_fast._C launchers.

The extension never sees a torch.Tensor (DESIGN.md, "Binding"): it gets data_ptr()
integers, sizes, strides, dtype codes, and the CPU thread count or the CUDA stream.
"""
from __future__ import annotations

import contextlib

import torch

from qwen3_fast import _ext

# Must match csrc/include/qwen3_fast/common.h DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# Upper bound on the OpenMP threads a CPU kernel gets (None: torch's thread count). The
# engine lowers it to 1 around decode steps of small batches: there a kernel works on a few
# rows, and a thread team costs more than the work (on a busy machine a team member that
# is not scheduled stalls the barrier for a time slice, ~ms). See cpu_thread_cap().
_cpu_thread_cap: int | None = None


@contextlib.contextmanager
def cpu_thread_cap(n: int | None):
    """Run the CPU kernels launched inside with at most `n` threads (None: no cap)."""
    global _cpu_thread_cap
    before, _cpu_thread_cap = _cpu_thread_cap, n
    try:
        yield
    finally:
        _cpu_thread_cap = before


# A CPU kernel that streams at least this many bytes from memory in one call (a decode
# step's weight GEMV: 2-300 MiB per call for Qwen3-0.6B) ignores the cap: one thread
# cannot pull memory bandwidth alone, and its work (hundreds of microseconds) dwarfs the
# cost of a thread team.
UNCAPPED_STREAM_BYTES = 1 << 20


def cpu_threads(stream_bytes: int = 0) -> int:
    """OpenMP threads for a CPU kernel that streams `stream_bytes` from memory: torch's
    thread count, under the cpu_thread_cap unless stream_bytes >= UNCAPPED_STREAM_BYTES."""
    threads = torch.get_num_threads()
    if _cpu_thread_cap is not None and stream_bytes < UNCAPPED_STREAM_BYTES:
        threads = min(threads, _cpu_thread_cap)
    return threads


def launch(backend: str, name: str, device: torch.device, *args, stream_bytes: int = 0) -> None:
    """Call `<name>_<backend>` with the thread count (cpu) or current stream (cuda).

    ``stream_bytes``: bytes the kernel streams from memory (CPU); at least
    UNCAPPED_STREAM_BYTES lifts the cpu_thread_cap."""
    C = _ext.extension()
    if backend == "cpu":
        getattr(C, f"{name}_cpu")(*args, cpu_threads(stream_bytes))
    elif backend == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            getattr(C, f"{name}_cuda")(*args, stream)
    else:
        raise ValueError(f"launch: backend {backend!r} has no compiled kernels")


def cuda_partial_rows(device: torch.device, rows: int) -> int:
    """Thread blocks (and float32 partial rows) for a column reduction over `rows`.

    4 per SM: csrc/cuda/rms_norm.cu sizes its backward blocks (<= 128 threads, <= 128
    registers) so that exactly four fit on an SM, making this grid one full wave.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rows, 4 * sms))
