"""Grouped GEMM: ``grouped_gemm(a, b, offsets, trans_b=False)``.

For each group (expert) e, rows offsets[e]:offsets[e+1] of a [M, K] times b[e]
(b [E, K, N], or [E, N, K] used transposed when ``trans_b``) -> c [M, N]. Rows outside
[offsets[0], offsets[E]) are zero. Empty groups are fine.

Backward: da = grouped_gemm(dc, b, offsets, not trans_b) (the other transpose) and
db[e] = a_e^T dc_e ([K, N]) or dc_e^T a_e ([N, K] when trans_b), a grouped GEMM whose
reduction length (the group's row count) differs per group (:func:`grouped_gemm_wgrad`).
Saved for backward: a and b (inputs, alive anyway) and offsets.

Backends: ``cpu`` runs one torch matmul per non-empty group into slices of one output.
That is deliberate: MKL/oneDNN are the well-kept CPU GEMMs and a group's matmul is a
plain dense GEMM. The exception is bfloat16 on CPUs with AVX512-BF16: there
csrc/cpu/grouped_gemm.cpp does all groups in one parallel loop, because oneDNN's per-call
weight reorder and per-shape kernel builds dominate small groups. Measured on the
Qwen3-30B-A3B layer (quiet, 2 cores): the NT form (trans_b, the forward) is 1.7x torch's
loop at 1 row per expert and equal at 32. The NN form (the backward's dx and dy @ W_down)
streams the weight row by row for groups of <= 4 rows (1.1-2.8x the float32 column tiles
it had before) and takes vdpbf16ps tiles over pairs of weight rows for bigger ones; against
torch's loop (2026-11-30, quiet, same process): 1.5-1.8x at 2 and 4 rows per expert on
average, 0.9-1.3x at 8, 0.57-0.74x at 16-32, so it takes groups of <= 6 rows on average
(NN_KERNEL_ROWS_PER_GROUP). The weight gradient of groups of
<= 4 rows (WGRAD_KERNEL_MAX_ROWS: an outer product or a few) is one C++ call too,
written with streaming stores; bigger groups stay on torch matmul. ``triton``:
ops/triton/grouped_gemm.py (one launch, each program finds its group from offsets).
``cuda``: csrc/cuda/grouped_gemm.cu (a shared-memory tiled kernel for sm_80+, each block
finds its group from the device offsets: no host sync), the correctness baseline.
``cutlass``: csrc/cuda/grouped_gemm_sm90.cu, a CUTLASS 3.x ptr-array grouped GEMM for
Hopper (sm_90a: TMA, wgmma, warp-specialized cooperative persistent kernel); a small
device kernel builds the per-group problem shapes, pointers and strides from the device
offsets, so it never synchronizes with the host either. float16/bfloat16, N and K
multiples of 8, compute capability 9.0, a build with 90a in QWEN3_FAST_CUDA_ARCHS. Its
weight gradient is the same CUTLASS kernel with a per-group reduction length (empty groups
get no tiles and are zero-filled). Select it per call with ``grouped_gemm(...,
backend="cutlass")``; the ``cuda`` backend (what ``moe_experts`` uses) takes it instead of
the tiled kernel when QWEN3_FAST_GROUPED_GEMM=cutlass or once "cutlass" is in
``GPU_VERIFIED["grouped_gemm"]`` (it is: every test passed on an H200), and falls back to the
tiled kernel for inputs CUTLASS cannot take.
``reference``: the per-group loop of ops/reference.py. Shapes: M rows (T*K slots),
K reduction, N output columns, E groups.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from qwen3_fast import _ext
from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops._kernel_args import code, launch, ptr
from qwen3_fast.ops.cpu_grad_cache import zeros_except

# Backend names grouped_gemm(..., backend=...) accepts: the global ones plus "cutlass".
GROUPED_GEMM_BACKENDS = _backend.BACKENDS + ("cutlass",)
# QWEN3_FAST_GROUPED_GEMM: which kernel the "cuda" backend runs ("tiled" or "cutlass").
_CUDA_KERNEL_ENV = "QWEN3_FAST_GROUPED_GEMM"


_NT_BF16: list[bool] = []
# The C++ NN kernel takes a grouped GEMM up to this many rows per group on average (M <= this
# times E); above it the per-group torch matmul runs (see grouped_gemm_forward).
NN_KERNEL_ROWS_PER_GROUP = 6
# Weight-gradient groups of at most this many rows go to csrc/cpu/grouped_gemm.cpp's
# grouped_wgrad_small_bf16 (kWgradMaxRows there).
WGRAD_KERNEL_MAX_ROWS = 4


def _nt_bf16_kernel() -> bool:
    """Whether _C has the AVX512-BF16 grouped GEMM (built with it, on this CPU)."""
    if not _NT_BF16:
        from qwen3_fast import _ext

        _NT_BF16.append(bool(_ext.available() and getattr(
            _ext.extension(), "grouped_gemm_nt_bf16_available", lambda: False)()))
    return _NT_BF16[0]


_SM90: list[bool] = []
_SM90_WORKSPACE: dict[tuple[int, int], int] = {}


def sm90_kernel_built() -> bool:
    """Whether _C has the CUTLASS sm_90a grouped GEMM (CUTLASS headers, 90a in the archs)."""
    if not _SM90:
        _SM90.append(bool(_ext.cuda_built() and getattr(
            _ext.extension(), "grouped_gemm_sm90_available", lambda: False)()))
    return _SM90[0]


def _cutlass_ok(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"it needs CUDA tensors, got {device.type} tensors"
    if not _ext.cuda_built():
        return False, "qwen3_fast._C was built without CUDA kernels"
    if not sm90_kernel_built():
        return False, ("this build has no CUTLASS sm_90a grouped GEMM (it needs the CUTLASS "
                       "headers and 90a in QWEN3_FAST_CUDA_ARCHS)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return False, f"it needs a compute capability 9.0 GPU (Hopper), {device} is {major}.{minor}"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"it takes float16 or bfloat16, got {dtype}"
    if n % 8 or k % 8:
        return False, f"N ({n}) and K ({k}) must be multiples of 8 (16-byte rows for TMA)"
    return True, ""


def cutlass_usable(a: Tensor, b: Tensor, trans_b: bool) -> tuple[bool, str]:
    """Whether the CUTLASS sm_90a kernel can run c = grouped_gemm(a, b, ., trans_b) (and
    its backward, which needs the same N, K conditions), and why not. Host-side facts
    only: no device synchronization."""
    return _cutlass_ok(a.device, a.dtype, b.shape[1] if trans_b else b.shape[2], a.shape[1])


def _cuda_kernel_is_cutlass() -> bool:
    """Whether the "cuda" backend runs the CUTLASS kernel (where it can) instead of the
    tiled one: QWEN3_FAST_GROUPED_GEMM=cutlass, or "cutlass" recorded as GPU-verified."""
    choice = os.environ.get(_CUDA_KERNEL_ENV, "").strip().lower()
    if choice not in ("", "tiled", "cutlass"):
        raise ValueError(f"{_CUDA_KERNEL_ENV}={choice!r}: expected 'tiled' or 'cutlass'")
    return choice == "cutlass" or (
        choice == "" and "cutlass" in _backend.GPU_VERIFIED.get("grouped_gemm", ()))


def _bounds(offsets: Tensor) -> list[int]:
    # A host copy of E+1 integers: free on the CPU; GPU backends never call this.
    return offsets.tolist()


# ------------------------------------------------------------------ one backend
def grouped_gemm_forward(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool,
                         backend: str) -> Tensor:
    """a [M, K] contiguous, b [E, K, N] / [E, N, K] contiguous -> c [M, N]."""
    if backend == "reference":
        return reference.grouped_gemm(a, b, offsets, trans_b)
    if backend == "triton":
        from qwen3_fast.ops.triton.grouped_gemm import grouped_gemm as triton_gemm

        return triton_gemm(a, b, offsets, trans_b)
    n = b.shape[1] if trans_b else b.shape[2]
    if backend == "cuda" and _cuda_kernel_is_cutlass() and cutlass_usable(a, b, trans_b)[0]:
        backend = "cutlass"
    if backend == "cutlass":
        c = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
        _cutlass_grouped_gemm(a, b, offsets, c, trans_b)
        return c
    if backend == "cuda":
        c = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
        _cuda_grouped_gemm(a, b, offsets, c, trans_b)
        return c
    bounds = _bounds(offsets)
    c = a.new_empty((a.shape[0], n))
    c[:bounds[0]].zero_()
    c[bounds[-1]:].zero_()
    if a.dtype == torch.bfloat16 and _nt_bf16_kernel() and (
            trans_b or a.shape[0] <= NN_KERNEL_ROWS_PER_GROUP * b.shape[0]):
        # csrc/cpu/grouped_gemm.cpp: one parallel loop over all experts (see its comment);
        # NT for the forward GEMMs, NN for the backward's dx and dy @ W_down while groups
        # are a few rows (its B panel is not packed: from ~8 rows per group oneDNN's
        # per-expert GEMM is faster, 1.5-1.75x at 32 rows, measured on the Qwen3-30B-A3B layer).
        launch("cpu", "grouped_gemm_nt_bf16" if trans_b else "grouped_gemm_nn_bf16", a.device,
               ptr(a), ptr(b), ptr(offsets), ptr(c), a.shape[0], n, a.shape[1], b.shape[0])
        return c
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.matmul(a[lo:hi], b[e].t() if trans_b else b[e], out=c[lo:hi])
    return c


def grouped_gemm_wgrad(a: Tensor, dc: Tensor, offsets: Tensor, trans_b: bool,
                       num_groups: int, backend: str) -> Tensor:
    """db for c = grouped_gemm(a, b, offsets, trans_b): a [M, K], dc [M, N] ->
    db [E, N, K] (trans_b) or [E, K, N]; zero for empty groups. K_e = group rows."""
    k, n = a.shape[1], dc.shape[1]
    shape = (num_groups, n, k) if trans_b else (num_groups, k, n)
    if backend == "triton":
        from qwen3_fast.ops.triton.grouped_gemm import grouped_gemm_wgrad as triton_wgrad

        return triton_wgrad(a, dc, offsets, trans_b, num_groups)
    if backend == "cuda" and _cuda_kernel_is_cutlass() and _cutlass_ok(a.device, a.dtype, n, k)[0]:
        backend = "cutlass"
    if backend in ("cuda", "cutlass"):
        db = torch.empty(shape, dtype=a.dtype, device=a.device)
        wgrad = _cutlass_grouped_wgrad if backend == "cutlass" else _cuda_grouped_wgrad
        wgrad(*((dc, a) if trans_b else (a, dc)), offsets, db)
        return db
    bounds = _bounds(offsets)
    written = [e for e in range(num_groups) if bounds[e + 1] > bounds[e]]
    # zero except the non-empty groups, which the kernels below overwrite in full; large
    # gradients come from recycled pages (cpu_grad_cache.py: no page faults per step)
    db = zeros_except(shape, a.dtype, written)
    small = 0
    if a.dtype == torch.bfloat16 and _nt_bf16_kernel():
        # groups of 1-4 rows (an expert with a token or a few) in one C++ call: an outer
        # product per row written straight to bf16, where oneDNN's GEMM with a reduction
        # length of 1-4 runs far below the write bandwidth (measured in bench/results/moe_cpu.md)
        small = WGRAD_KERNEL_MAX_ROWS
        p, q = (dc, a) if trans_b else (a, dc)
        p, q = p.contiguous(), q.contiguous()
        launch("cpu", "grouped_wgrad_small_bf16", a.device, ptr(p), ptr(q), ptr(offsets), ptr(db),
               a.shape[0], p.shape[1], q.shape[1], num_groups)
    for e in written:
        lo, hi = bounds[e], bounds[e + 1]
        if hi - lo <= small:
            continue
        if trans_b:
            torch.matmul(dc[lo:hi].t(), a[lo:hi], out=db[e])
        else:
            torch.matmul(a[lo:hi].t(), dc[lo:hi], out=db[e])
    return db


def _cuda_grouped_gemm(a, b, offsets, c, trans_b):
    # offsets stay on the device: the kernel finds each tile's group itself (no host sync)
    launch("cuda", "grouped_gemm", a.device, ptr(a), ptr(b), ptr(offsets), ptr(c), a.shape[0],
           c.shape[1], a.shape[1], b.shape[0], bool(trans_b), code(a))


def _cuda_grouped_wgrad(x, y, offsets, out):
    launch("cuda", "grouped_gemm_wgrad", x.device, ptr(x), ptr(y), ptr(offsets), ptr(out),
           x.shape[0], x.shape[1], y.shape[1], out.shape[0], code(x))


def _aligned16(t: Tensor) -> Tensor:
    # TMA needs 16-byte aligned bases; a contiguous row slice of a bigger tensor may not be
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _sm90_workspace(device: torch.device, groups: int) -> Tensor:
    """Scratch for the CUTLASS launchers (per-group arrays + TMA descriptors), from torch's
    caching allocator on the current stream (stream-ordered reuse, no cudaMalloc)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), groups)
    nbytes = _SM90_WORKSPACE.get(key)
    if nbytes is None:
        with torch.cuda.device(device):  # its size depends on the device's SM count
            nbytes = int(_ext.extension().grouped_gemm_sm90_workspace_size(groups))
        _SM90_WORKSPACE[key] = nbytes
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _cutlass_grouped_gemm(a, b, offsets, c, trans_b):
    a, b = _aligned16(a), _aligned16(b)
    ws = _sm90_workspace(a.device, b.shape[0])
    launch("cuda", "grouped_gemm_sm90", a.device, ptr(a), ptr(b), ptr(offsets), ptr(c), ptr(ws),
           ws.numel(), a.shape[0], c.shape[1], a.shape[1], b.shape[0], bool(trans_b), code(a))


def _cutlass_grouped_wgrad(x, y, offsets, out):
    x, y = _aligned16(x), _aligned16(y)
    ws = _sm90_workspace(x.device, out.shape[0])
    launch("cuda", "grouped_gemm_sm90_wgrad", x.device, ptr(x), ptr(y), ptr(offsets), ptr(out),
           ptr(ws), ws.numel(), x.shape[0], x.shape[1], y.shape[1], out.shape[0], code(x))


# ------------------------------------------------------------------ custom ops
@_backend.custom_op("qwen3_fast::grouped_gemm_fwd")
def _grouped_gemm_fwd(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool,
                      backend: str) -> Tensor:
    return grouped_gemm_forward(a.contiguous(), b.contiguous(), offsets, trans_b, backend)


@_grouped_gemm_fwd.register_fake
def _(a, b, offsets, trans_b, backend):
    return a.new_empty((a.shape[0], b.shape[1] if trans_b else b.shape[2]))


@torch.library.custom_op("qwen3_fast::grouped_gemm_wgrad", mutates_args=())
def _grouped_gemm_wgrad(a: Tensor, dc: Tensor, offsets: Tensor, trans_b: bool, num_groups: int,
                        backend: str) -> Tensor:
    return grouped_gemm_wgrad(a.contiguous(), dc.contiguous(), offsets, trans_b, num_groups,
                              backend)


@_grouped_gemm_wgrad.register_fake
def _(a, dc, offsets, trans_b, num_groups, backend):
    k, n = a.shape[1], dc.shape[1]
    return a.new_empty((num_groups, n, k) if trans_b else (num_groups, k, n))


def _setup(ctx, inputs, output):
    a, b, offsets, trans_b, backend = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b, ctx.backend = trans_b, backend


def _backward(ctx, dc):
    a, b, offsets = ctx.saved_tensors
    da = db = None
    if ctx.needs_input_grad[0]:
        # c = a B (B = b[e] or b[e]^T)  =>  da = dc B^T: the same grouped GEMM, other transpose
        da = _grouped_gemm_fwd(dc, b, offsets, not ctx.trans_b, ctx.backend)
    if ctx.needs_input_grad[1]:
        db = _grouped_gemm_wgrad(a, dc, offsets, ctx.trans_b, b.shape[0], ctx.backend)
    return da, db, None, None, None


torch.library.register_autograd("qwen3_fast::grouped_gemm_fwd", _backward, setup_context=_setup)


# ------------------------------------------------------------------ public
def check_offsets(offsets: object, num_groups: int, rows: int, name: str = "offsets") -> Tensor:
    """offsets must be [E+1] int64, non-decreasing, within [0, rows] (values checked on CPU)."""
    _checks.check_tensor(offsets, name, dtypes=(torch.int64,), ndim=1)
    if offsets.shape[0] != num_groups + 1:
        raise ValueError(f"{name} has {offsets.shape[0]} entries; expected E+1 = {num_groups + 1} "
                         f"(one more than the expert count of b)")
    # Reading values would sync a GPU; device kernels clamp each group to [0, rows] instead.
    if offsets.device.type == "cpu":
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing (monotone), got {offsets.tolist()}")
        if int(offsets[0]) < 0 or int(offsets[-1]) > rows:
            raise ValueError(f"{name} values must lie in [0, {rows}] (the rows of a), got "
                             f"first {int(offsets[0])}, last {int(offsets[-1])}")
    return offsets


def _explicit_backend(backend: object, a: Tensor, b: Tensor, trans_b: bool) -> str:
    """Validates a per-call backend choice against these inputs (ValueError naming it)."""
    if not isinstance(backend, str) or backend not in GROUPED_GEMM_BACKENDS:
        raise ValueError(f"backend must be None or one of {', '.join(GROUPED_GEMM_BACKENDS)}, "
                         f"got {backend!r}")
    if backend == "cutlass":
        ok, why = cutlass_usable(a, b, trans_b)
    else:
        ok, why = _backend.backend_usable(backend, a.device.type)
        if ok and backend in ("cuda", "triton") and a.dtype not in _backend.KERNEL_DTYPES:
            kinds = ", ".join(map(str, _backend.KERNEL_DTYPES))
            ok, why = False, f"its kernels take {kinds}, got {a.dtype}"
    if not ok:
        raise ValueError(f"backend={backend!r} cannot run here: {why}")
    return backend


def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False,
                 backend: str | None = None) -> Tensor:
    """Per-group matrix product.

    Parameters
    ----------
    a : [M, K] float32/float16/bfloat16/float64
    b : [E, K, N], or [E, N, K] when ``trans_b`` (a's dtype and device)
    offsets : [E+1] int64, non-decreasing; group e owns rows offsets[e]:offsets[e+1]
    trans_b : use b[e]^T
    backend : None (the per-device default, or the one forced with ``ops.set_backend``) or
        one of "reference", "cpu", "cuda", "triton", "cutlass" for this call (forward and
        backward); ValueError when it cannot run on these inputs.

    Returns
    -------
    c : [M, N] in a's dtype, c[rows of e] = a[rows of e] @ b[e] (or b[e]^T); other rows 0.
    Differentiable w.r.t. a and b.
    """
    _checks.check_tensor(a, "a", ndim=2)
    _checks.check_tensor(b, "b", ndim=3)
    _checks.check_same_dtype(a, "a", b, "b")
    _checks.check_same_device(a, "a", b, "b")
    if not isinstance(trans_b, bool):
        raise TypeError(f"trans_b must be a bool, got {type(trans_b).__name__}")
    k_b = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != k_b:
        raise ValueError(f"b has shape {tuple(b.shape)}; expected the reduction size K = "
                         f"{a.shape[1]} (a's columns) in dim {2 if trans_b else 1} "
                         f"(trans_b={trans_b})")
    _checks.check_same_device(a, "a", offsets, "offsets")
    check_offsets(offsets, b.shape[0], a.shape[0])
    if backend is None:
        backend = _backend.resolve("grouped_gemm", a)
    else:
        backend = _explicit_backend(backend, a, b, trans_b)
    return _backend.call_op(_grouped_gemm_fwd, a, b, offsets, trans_b, backend)
