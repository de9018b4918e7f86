"""Which implementation runs an op: per call, from the tensors' device and an override.

Backends: ``reference`` (plain torch, ops/reference.py), ``cpu`` (C++ kernels in
qwen3_fast._C), ``cuda`` (CUDA C++ kernels in qwen3_fast._C), ``triton``
(ops/triton/, on the CPU only under TRITON_INTERPRET=1).

Defaults: CPU tensors use ``cpu``; CUDA tensors use the first backend in
``GPU_VERIFIED[op]`` (kernels whose tests passed on a real GPU through
bench/gpu_check.sh, recorded in bench/results/), else ``reference``. float64 always runs
on the reference (the kernels are float32/float16/bfloat16). Override with the
environment variable QWEN3_FAST_BACKEND or :func:`set_backend` / :func:`use_backend`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Iterator

import torch

from qwen3_fast import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

# GPU backends verified on real hardware, per op, in preference order: an entry is added
# only when every test of that kernel passed on a GPU through bench/gpu_check.sh (recorded
# in bench/results/gpu_*/) and the kernel's code has not changed since. From the H200 run of
# 2026-11-29 (commit aeb0113, bench/results/gpu_2026-11-29/): the CUDA C++ norms, SwiGLU,
# QK-norm+RoPE, flash-decoding and grouped GEMM (the tiled kernel and the CUTLASS sm_90a
# one, which the grouped GEMM's cuda backend then prefers where usable). flash_decode's
# optional max_length (the captured decode step's fixed split count) came later and is
# unverified, like that step. Not yet: kv_quantize (its fp32 tests failed against a
# reference that divided differently, fixed since), moe_permute and moe (the CUDA sort was
# rewritten after that run), Triton.
GPU_VERIFIED: dict[str, tuple[str, ...]] = {
    "rms_norm": ("cuda",),
    "add_rms_norm": ("cuda",),
    "silu_and_mul": ("cuda",),
    "qk_norm_rope": ("cuda",),
    "kv_quantize": (),
    "flash_decode": ("cuda",),
    "moe": (),
    "moe_permute": (),
    "grouped_gemm": ("cuda", "cutlass"),
}

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate(name: str | None, source: str) -> str | None:
    if name is None or name == "":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source}: backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name


_forced: str | None = _validate(os.environ.get("QWEN3_FAST_BACKEND"), "QWEN3_FAST_BACKEND")
_warned_no_extension = False


def set_backend(name: str | None) -> None:
    """Force one backend for every op (None restores the per-device default)."""
    global _forced
    _forced = _validate(name, "set_backend(name)")


def get_backend() -> str | None:
    """The forced backend, or None when the per-device default applies."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_usable(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether `backend` can run on tensors of `device_type`, and why not."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend needs CPU tensors, got {device_type}"
        if not _ext.available():
            return False, "qwen3_fast._C is not built (pip install .)"
        return True, ""
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got {device_type}"
        if not _ext.cuda_built():
            return False, "qwen3_fast._C was built without CUDA kernels"
        return True, ""
    if backend == "triton":
        if not triton_available():
            return False, "triton is not installed (pip install '.[triton]')"
        if device_type == "cpu" and not triton_interpret():
            return False, "Triton on CPU tensors needs TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return False, f"triton does not run on {device_type} tensors"
        return True, ""
    return False, f"unknown backend {backend!r}"


def default_backend(op: str, device_type: str) -> str:
    """The backend an op uses on a device when nothing is forced."""
    global _warned_no_extension
    if device_type == "cpu":
        if _ext.available():
            return "cpu"
        if not _warned_no_extension:
            _warned_no_extension = True
            warnings.warn("qwen3_fast._C is not built; ops run on the slow reference path "
                          "(pip install . builds the kernels)", stacklevel=3)
        return "reference"
    if device_type == "cuda":
        for backend in GPU_VERIFIED.get(op, ()):
            if backend_usable(backend, "cuda")[0]:
                return backend
    return "reference"


def resolve(op: str, tensor: torch.Tensor) -> str:
    """The backend for one call of `op` on `tensor`'s device and dtype."""
    if tensor.dtype not in KERNEL_DTYPES:
        return "reference"
    device_type = tensor.device.type
    if _forced is None:
        return default_backend(op, device_type)
    ok, why = backend_usable(_forced, device_type)
    if not ok:
        raise RuntimeError(f"{op}: forced backend {_forced!r} cannot run here: {why}")
    return _forced


def chunked_op_backend(op: str, device_type: str, dtype=None) -> str:
    """The backend of a fused large-vocabulary op (linear_cross_entropy, linear_logprobs,
    linear_jsd): "chunked" (torch ops per chunk of tokens; any device), "triton" (the
    per-chunk Triton kernel) or "reference" (the unfused oracle). Triton is the CUDA default
    only once `op` has passed on a GPU (GPU_VERIFIED); a forced "cpu"/"cuda" means chunked.
    The Triton kernels are fp32: float64 inputs (gradcheck) take the chunked path instead."""
    forced = get_backend()
    if forced is None:
        verified = "triton" in GPU_VERIFIED.get(op, ())
        return "triton" if device_type == "cuda" and verified else "chunked"
    ok, why = backend_usable(forced, device_type)
    if not ok:
        raise RuntimeError(f"{op}: forced backend {forced!r} cannot run here: {why}")
    if forced == "triton" and dtype == torch.float64:
        return "chunked"
    return forced if forced in ("reference", "triton") else "chunked"


# ------------------------------------------------------------------ eager calls
# torch.library.custom_op routes a call through the dispatcher, autograd and dynamo's
# disable wrapper before it reaches the implementation: 10-20 us per call on the 2-core CI
# machine, about a sixth of a decode step of a small model (~40 op calls per step). In
# eager inference that routing does nothing, so call_op skips it.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` that also keeps the plain
    function for :func:`call_op` (ops that mutate inputs are registered the usual way)."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.eager_impl = fn
        return op
    return wrap


def dispatch_needed(args) -> bool:
    """Whether a call with `args` needs the dispatcher: autograd (grad mode on and an input
    that requires grad), torch.compile tracing, a dispatch mode (fake tensors, make_fx,
    FlopCounterMode), functorch transforms, a tensor subclass, or the profiler (which
    records the op by name)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch.autograd._profiler_enabled()):
        return True
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSOR_TYPES
                                            or (grad and a.requires_grad)):
            return True
    return False


def call_op(op, *args):
    """``op(*args)``; in eager inference (see :func:`dispatch_needed`) the implementation
    registered with :func:`custom_op` directly, with the same result."""
    if dispatch_needed(args):
        return op(*args)
    return op.eager_impl(*args)
