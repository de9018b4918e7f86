"""Shared test helpers: which (device, backend) pairs exist here, and dtype tolerances."""
from __future__ import annotations

import importlib
import os

import torch

# Without a GPU, Triton kernels run in the interpreter. TRITON_INTERPRET must be set before
# anything imports triton (torch.compile and opcheck do): triton.language's own @jit helpers
# (tl.sum's combine function, ...) are made interpreted or compiled at that first import,
# and an interpreted kernel cannot call a compiled helper.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from qwen3_fast import _ext  # noqa: E402
from qwen3_fast.ops import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def compiled_backends() -> list:
    """(device, backend) pairs for the compiled and GPU kernels, as pytest params.

    Triton on the CPU (interpreter) has its own test module, test_triton_ops.py.
    """
    params = [pytest.param("cpu", "cpu", id="cpu",
                           marks=pytest.mark.skipif(not _ext.available(), reason="_C not built"))]
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not (HAS_CUDA and _ext.cuda_built()), reason="needs a GPU and CUDA kernels")]))
    params.append(pytest.param("cuda", "triton", id="triton-cuda", marks=[
        pytest.mark.cuda, pytest.mark.triton,
        pytest.mark.skipif(not (HAS_CUDA and _backend.triton_available()), reason="needs a GPU and triton")]))
    return params


# Norm-wise relative error allowed against the float32 oracle (METHOD.md: ||out-ref||/||ref||),
# and the elementwise tolerance for assert_close.
REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ELEM_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 4e-2)}


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype,
                           scale: float = 1.0, name: str = "") -> None:
    """Compare a kernel result to the float32/float64 oracle with dtype tolerances."""
    assert actual.shape == oracle.shape, f"{name}: shape {actual.shape} != {oracle.shape}"
    a, o = actual.double(), oracle.double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    # Floor the denominator at elements of size 0.1: where the oracle cancels to ~0
    # (e.g. dx of a 1-wide norm) only absolute error is meaningful.
    denom = max(o.norm().item(), 0.1 * o.numel() ** 0.5)
    if o.numel() > 0:
        rel = (a - o).norm().item() / denom
        assert rel <= REL_TOL[dtype] * scale, f"{name}: relative error {rel:.3g} > {REL_TOL[dtype] * scale:.3g}"
    rtol, atol = ELEM_TOL[dtype]
    torch.testing.assert_close(a, o, rtol=rtol * scale, atol=atol * scale * max(1.0, o.abs().max().item()),
                               msg=lambda m: f"{name}: {m}")


def grouped_gemm_oracle(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                        trans_b: bool) -> torch.Tensor:
    """The per-expert loop in float64 on a's device: the oracle of every grouped GEMM test
    (rows outside every group stay 0)."""
    c = torch.zeros(a.shape[0], b.shape[1] if trans_b else b.shape[2], dtype=torch.float64,
                    device=a.device)
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        be = b[e].double()
        c[lo:hi] = a[lo:hi].double() @ (be.t() if trans_b else be)
    return c


def require_interpreted_triton(kernels: dict[str, str]) -> None:
    """Skip unless the Triton kernels {module: kernel name} run in the interpreter here.

    Without a GPU this conftest set TRITON_INTERPRET=1 before triton loaded, so they do.
    With a GPU the process compiles Triton kernels (the cuda-marked tests cover those);
    set TRITON_INTERPRET=1 yourself to test the interpreter on CPU there.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present, so this process compiles Triton kernels; run with "
                    "TRITON_INTERPRET=1 to test the interpreter on CPU")
    from triton.runtime.interpreter import InterpretedFunction

    for module, kernel in kernels.items():
        if not isinstance(getattr(importlib.import_module(module), kernel), InterpretedFunction):
            pytest.skip(f"{module} was imported compiled in this process; run with "
                        "TRITON_INTERPRET=1 set from the start")


def ulp(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at the magnitude of `e`."""
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(info.tiny))))
