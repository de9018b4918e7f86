"""MoE token permutation: ``moe_permute`` (group token copies by expert) and
``moe_unpermute`` (weighted combine back to token order), both differentiable.

A slot s = t * K + k is token t's k-th expert choice. ``moe_permute`` returns the rows
x_sorted [T*K, H] (expert 0's tokens first, token order within an expert), offsets [E+1]
(expert e owns rows offsets[e]:offsets[e+1]; experts with no tokens have an empty range)
and row_map [T*K] (slot -> sorted row). ``moe_unpermute(y_sorted, row_map, weights)``
returns y[t] = sum_k y_sorted[row_map[t*K+k]] * weights[t, k] with HF's rounding (each
product rounded to the activation dtype, the K products summed in float32).

Layers as in ops/rms_norm.py. Kernels: csrc/cpu/moe_permute.cpp (``cpu``),
csrc/cuda/moe_permute.cu (``cuda``); the ``reference`` and ``triton`` backends use torch
index ops (argsort, index_put) - there is no Triton permutation kernel, the Triton backend
of the MoE block is its grouped GEMM. Backward: d x = the plain (unweighted) combine of
d x_sorted; d y_sorted = dy gathered per slot times the weight, d weights = <dy[t],
y_sorted[row]> in float32. Nothing is saved but row_map, the weights and y_sorted (needed
for d weights).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks
from qwen3_fast.ops._kernel_args import code, launch, ptr

_TORCH_BACKENDS = ("reference", "triton")
# Slots per chunk of the CUDA sort (kSortChunk in csrc/cuda/moe_permute.cu, which checks the
# workspace size this implies)
CUDA_SORT_CHUNK = 1024


# ------------------------------------------------------------------ one backend, 2-D
def sort_by_expert(expert_ids: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor]:
    """expert_ids [T, K] int64 -> (offsets [E+1] int64, row_map [T*K] int64); stable."""
    flat = expert_ids.reshape(-1)
    if backend in _TORCH_BACKENDS:
        order = torch.argsort(flat, stable=True)
        row_map = torch.empty_like(order)
        row_map[order] = torch.arange(order.numel(), device=order.device)
        offsets = flat.new_zeros(num_experts + 1)
        offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0)
        return offsets, row_map
    flat = flat.contiguous()
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=flat.device)
    row_map = torch.empty_like(flat)
    if backend == "cuda":  # per-chunk expert counts, then the row of each chunk's first slot
        elems = -(-flat.numel() // CUDA_SORT_CHUNK) * num_experts
        workspace = torch.empty(max(elems, 1), dtype=torch.int64, device=flat.device)
        launch(backend, "moe_sort", flat.device, ptr(flat), ptr(offsets), ptr(row_map),
               ptr(workspace), elems, flat.numel(), num_experts)
    else:
        launch(backend, "moe_sort", flat.device, ptr(flat), ptr(offsets), ptr(row_map),
               flat.numel(), num_experts)
    return offsets, row_map


def permute_rows(x: Tensor, row_map: Tensor, top_k: int, scale: Optional[Tensor],
                 backend: str) -> Tensor:
    """x [T, H] (row stride free) -> out [T*K, H], out[row_map[t*K+k]] = x[t] (* scale[t*K+k],
    rounded to x's dtype, when scale [T*K] float32 is given)."""
    tokens, cols = x.shape
    if backend in _TORCH_BACKENDS:
        rows = x.repeat_interleave(top_k, dim=0)
        if scale is not None:
            rows = rows * scale.to(x.dtype).unsqueeze(1)
        out = torch.empty_like(rows)
        out[row_map] = rows
        return out
    out = torch.empty((tokens * top_k, cols), dtype=x.dtype, device=x.device)
    launch(backend, "moe_permute", x.device, ptr(x), x.stride(0), ptr(row_map), ptr(scale),
           ptr(out), tokens, top_k, tokens * top_k, cols, code(x))
    return out


def unpermute_rows(src: Tensor, row_map: Tensor, weights: Optional[Tensor], top_k: int,
                   backend: str) -> Tensor:
    """src [T*K, H] contiguous, weights [T*K] float32 or None (plain sum) -> y [T, H]."""
    rows, cols = src.shape
    tokens = row_map.numel() // top_k
    if backend in _TORCH_BACKENDS:
        g = src[row_map].view(tokens, top_k, cols)
        if weights is not None:
            g = g * weights.to(src.dtype).view(tokens, top_k, 1)
        acc = torch.float64 if src.dtype == torch.float64 else torch.float32
        return g.to(acc).sum(1).to(src.dtype)
    y = torch.empty((tokens, cols), dtype=src.dtype, device=src.device)
    launch(backend, "moe_unpermute", src.device, ptr(src), ptr(row_map), ptr(weights), ptr(y),
           tokens, top_k, rows, cols, code(src))
    return y


def unpermute_rows_backward(dy: Tensor, src: Tensor, row_map: Tensor, weights: Tensor,
                            backend: str) -> tuple[Tensor, Tensor]:
    """dy [T, H], src [T*K, H], weights [T*K] float32 -> (d_src [T*K, H], d_weights [T*K] fp32)."""
    dy = dy.contiguous()
    tokens, cols = dy.shape
    top_k = row_map.numel() // max(1, tokens)
    if backend in _TORCH_BACKENDS:
        dy_rep = dy.repeat_interleave(top_k, dim=0)  # [T*K, H] in slot order
        g = src[row_map]
        acc = torch.float64 if src.dtype == torch.float64 else torch.float32
        d_weights = (dy_rep.to(acc) * g.to(acc)).sum(-1).to(weights.dtype)
        d_src = torch.empty_like(src)
        d_src[row_map] = dy_rep * weights.to(src.dtype).unsqueeze(1)
        return d_src, d_weights
    d_src = torch.empty_like(src)
    d_weights = torch.empty(row_map.numel(), dtype=torch.float32, device=src.device)
    launch(backend, "moe_unpermute_backward", src.device, ptr(dy), ptr(src), ptr(row_map),
           ptr(weights), ptr(d_src), ptr(d_weights), tokens, top_k, src.shape[0], cols,
           code(src))
    return d_src, d_weights


# ------------------------------------------------------------------ custom ops
@_backend.custom_op("qwen3_fast::moe_permute_fwd")
def _moe_permute_fwd(x: Tensor, expert_ids: Tensor, num_experts: int,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    offsets, row_map = sort_by_expert(expert_ids, num_experts, backend)
    return permute_rows(x, row_map, expert_ids.shape[1], None, backend), offsets, row_map


@_moe_permute_fwd.register_fake
def _(x, expert_ids, num_experts, backend):
    slots = expert_ids.numel()
    return (x.new_empty((slots, x.shape[1])), expert_ids.new_empty((num_experts + 1,)),
            expert_ids.new_empty((slots,)))


@_backend.custom_op("qwen3_fast::moe_unpermute_fwd")
def _moe_unpermute_fwd(src: Tensor, row_map: Tensor, weights: Optional[Tensor], top_k: int,
                       backend: str) -> Tensor:
    return unpermute_rows(src.contiguous(), row_map, weights, top_k, backend)


@_moe_unpermute_fwd.register_fake
def _(src, row_map, weights, top_k, backend):
    return src.new_empty((row_map.shape[0] // top_k, src.shape[1]))


@torch.library.custom_op("qwen3_fast::moe_unpermute_bwd", mutates_args=())
def _moe_unpermute_bwd(dy: Tensor, src: Tensor, row_map: Tensor, weights: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    return unpermute_rows_backward(dy, src.contiguous(), row_map, weights, backend)


@_moe_unpermute_bwd.register_fake
def _(dy, src, row_map, weights, backend):
    return src.new_empty(src.shape), weights.new_empty((row_map.shape[0],))


def _permute_setup(ctx, inputs, output):
    x, expert_ids, _, backend = inputs
    _, _, row_map = output
    # row_map (8 bytes per slot) is all the backward needs: d x is a plain combine.
    ctx.save_for_backward(row_map)
    ctx.top_k, ctx.backend = expert_ids.shape[1], backend


def _permute_backward(ctx, d_sorted, d_offsets, d_row_map):
    (row_map,) = ctx.saved_tensors
    dx = _moe_unpermute_fwd(d_sorted.contiguous(), row_map, None, ctx.top_k, ctx.backend)
    return dx, None, None, None


torch.library.register_autograd("qwen3_fast::moe_permute_fwd", _permute_backward,
                                setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output):
    src, row_map, weights, top_k, backend = inputs
    # src is kept for d weights = <dy, src row>; with weights None no tensor is needed.
    ctx.save_for_backward(src, row_map, weights)
    ctx.top_k, ctx.backend, ctx.weighted = top_k, backend, weights is not None


def _unpermute_backward(ctx, dy):
    src, row_map, weights = ctx.saved_tensors
    if not ctx.weighted:
        return permute_rows(dy.contiguous(), row_map, ctx.top_k, None, ctx.backend), None, None, \
            None, None
    d_src, d_weights = _moe_unpermute_bwd(dy, src, row_map, weights, ctx.backend)
    return d_src, None, d_weights, None, None


torch.library.register_autograd("qwen3_fast::moe_unpermute_fwd", _unpermute_backward,
                                setup_context=_unpermute_setup)


# ------------------------------------------------------------------ public
def _check_ids(expert_ids: object, name: str = "expert_ids") -> Tensor:
    _checks.check_tensor(expert_ids, name, dtypes=(torch.int64,), ndim=2)
    if expert_ids.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(expert_ids.shape)}; expected [T, K], K > 0")
    return expert_ids


def _check_id_values(expert_ids: Tensor, num_experts: int) -> None:
    # One host sync on a GPU: the CUDA sort trusts its ids. moe_experts, whose ids come
    # from top-k, does not call this. The C++ CPU kernel re-checks too.
    if expert_ids.numel() > 0:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids has values in [{lo}, {hi}]; expected each in "
                             f"[0, num_experts={num_experts})")


def moe_permute(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Copy each token once per chosen expert, grouped by expert.

    Parameters
    ----------
    x : [T, H] float tensor (last dim contiguous)
    expert_ids : [T, K] int64, values in [0, num_experts)
    num_experts : E

    Returns
    -------
    x_sorted [T*K, H] (x's dtype), offsets [E+1] int64, row_map [T*K] int64 (slot -> row).
    Differentiable w.r.t. x.
    """
    _checks.check_tensor(x, "x", ndim=2)
    _checks.check_last_dim(x, "x")
    _check_ids(expert_ids)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids has {expert_ids.shape[0]} rows; expected one per token of "
                         f"x ({x.shape[0]})")
    _checks.check_same_device(x, "x", expert_ids, "expert_ids")
    _check_id_values(expert_ids, num_experts)
    backend = _backend.resolve("moe_permute", x)
    return _backend.call_op(_moe_permute_fwd, x, expert_ids, num_experts, backend)


def moe_unpermute(y_sorted: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """Weighted combine back to token order: y[t] = sum_k y_sorted[row_map[t*K+k]] * w[t, k].

    Parameters
    ----------
    y_sorted : [T*K, H] float tensor (expert-sorted rows)
    row_map : [T*K] int64 from :func:`moe_permute`
    weights : [T, K] float tensor (any float dtype; used in float32, cast to y's dtype
        before each product as HF does)

    Returns
    -------
    y [T, H] in y_sorted's dtype. Differentiable w.r.t. y_sorted and weights.
    """
    _checks.check_tensor(y_sorted, "y_sorted", ndim=2)
    _checks.check_last_dim(y_sorted, "y_sorted")
    _checks.check_tensor(row_map, "row_map", dtypes=(torch.int64,), ndim=1)
    _checks.check_tensor(weights, "weights", ndim=2)
    t, k = weights.shape
    if k == 0 or row_map.shape[0] != t * k or y_sorted.shape[0] != t * k:
        raise ValueError(f"row_map has {row_map.shape[0]} entries and y_sorted {y_sorted.shape[0]} "
                         f"rows; expected T*K = {t * k} from weights {tuple(weights.shape)}")
    _checks.check_same_device(y_sorted, "y_sorted", row_map, "row_map")
    _checks.check_same_device(y_sorted, "y_sorted", weights, "weights")
    backend = _backend.resolve("moe_permute", y_sorted)
    # float32 weights for the kernels (float64 stays float64 on the reference path)
    w32 = weights.to(torch.float64 if weights.dtype == torch.float64 and backend == "reference"
                     else torch.float32).reshape(-1).contiguous()
    return _backend.call_op(_moe_unpermute_fwd, y_sorted, row_map, w32, k, backend)
