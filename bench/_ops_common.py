"""Shared driver for the op benchmarks: the (device, implementation) matrix, input
building, forward or forward+backward timing, and the bytes each op must move.

Implementations: on CPU ``qwen3_fast`` (the default backend: C++ kernels), ``reference``
(ops/reference.py) and ``hf_eager`` (transformers' modules); on CUDA ``cuda`` and
``triton`` (forced backends, whatever their verification status), ``reference`` and
``hf_eager``. CUDA timings synchronize inside the timed call.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from qwen3_fast import _ext, ops
from qwen3_fast.ops import _backend

from _bandwidth import measure_bandwidth

TOKENS = [1, 128, 4096]
HIDDEN = [1024, 4096]
MODES = ["fwd", "fwd+bwd"]


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


_NO_HF = pytest.mark.skipif(not hf_available(), reason="transformers not installed")
_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
_NO_CUDA_KERNELS = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.cuda_built()),
                                      reason="needs a GPU and the CUDA kernels")
_NO_TRITON = pytest.mark.skipif(not (torch.cuda.is_available() and _backend.triton_available()),
                                reason="needs a GPU and triton")

DEVICE_IMPLS = [
    pytest.param("cpu", "qwen3_fast", id="cpu-qwen3_fast"),
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cpu", "hf_eager", id="cpu-hf_eager", marks=_NO_HF),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=[pytest.mark.cuda, _NO_CUDA_KERNELS]),
    pytest.param("cuda", "triton", id="cuda-triton", marks=[pytest.mark.cuda, _NO_TRITON]),
    pytest.param("cuda", "reference", id="cuda-reference", marks=[pytest.mark.cuda, _NO_GPU]),
    pytest.param("cuda", "hf_eager", id="cuda-hf_eager", marks=[pytest.mark.cuda, _NO_GPU, _NO_HF]),
]


def backend_context(device: str, impl: str):
    """Force the kernel backend for the qwen3_fast implementations on CUDA."""
    if device == "cuda" and impl in ("cuda", "triton"):
        return ops.use_backend(impl)
    return contextlib.nullcontext()


def run_bench(benchmark, *, fn, inputs, mode, nbytes_fwd, nbytes_bwd, impl, device, group):
    """Time `fn(*inputs)` (and its backward against a fixed upstream gradient)."""
    benchmark.group = f"{device}-{group}"
    benchmark.extra_info.update(impl=impl, device=device, bandwidth=measure_bandwidth(device),
                                bytes=nbytes_fwd + (nbytes_bwd if mode == "fwd+bwd" else 0))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rounds = 20 if device == "cuda" else 7
    with backend_context(device, impl):
        if mode == "fwd":
            def fwd():
                fn(*inputs)
                sync()

            with torch.no_grad():
                benchmark.pedantic(fwd, rounds=rounds, warmup_rounds=2, iterations=1)
            return
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = tuple(torch.randn_like(o) for o in outs)

        def step():
            for t in leaves:
                t.grad = None
            res = fn(*inputs)
            torch.autograd.backward(res if isinstance(res, tuple) else (res,), grads)
            sync()

        benchmark.pedantic(step, rounds=max(5, rounds // 2), warmup_rounds=2, iterations=1)
