"""Mixture-of-experts ops: routing, the fused expert FFN, load-balancing losses.

Public (all in ``qwen3_fast.ops``)::

    moe_route(router_logits, top_k, norm_topk_prob) -> (weights [T,K] f32, expert_ids [T,K]
        i64, router_probs [T,E] f32)       differentiable through weights and probs
    moe_experts(x, router_logits, w_gate_up, w_down, top_k, norm_topk_prob) -> y [T, H]
    load_balancing_loss(router_logits_per_layer, num_experts, top_k, attention_mask=None)
        HF's ``load_balancing_loss_func`` (f and P over this batch)
    expert_selection_counts(router_logits_per_layer, num_experts, top_k,
                            attention_mask=None) -> counts [E+1] float64 (no grad)
    global_expert_frequencies(counts, group=None) -> f [E] float32 (no grad)
    global_load_balancing_loss(router_logits_per_layer, frequencies, attention_mask=None)
        -> scalar: E * sum_e f_e * P_e, P_e local and differentiable

Exactly HF Qwen3-MoE: router softmax in fp32, top-k, divide by the top-k sum when
``norm_topk_prob``, routing weights cast to the activation dtype before the multiply.
Expert weights are stacked, ``w_gate_up`` [E, 2I, H] (gate rows then up rows) and
``w_down`` [E, H, I]. The one departure: the K weighted expert outputs of a token are
summed in float32 and rounded once (HF adds them one by one in the model dtype).

``moe_experts`` is one custom op (``qwen3_fast::moe_experts_fwd``/``_bwd``): route, permute
(ops/moe_permute.py), gate_up grouped GEMM (ops/grouped_gemm.py), silu_and_mul, down
grouped GEMM, weighted combine. Its backward recomputes x_sorted (a row gather) and the
SwiGLU activation from the saved gate_up instead of saving them; it saves only gate_up
[T*K, 2I] (the activation's input: recomputing it would cost a GEMM), the routing weights
[T, K] f32, expert ids, offsets [E+1] and row_map [T*K]; x, the logits and the weights are
inputs, alive anyway. The router weights' gradient uses <dy, act @ Wd^T> = <dy @ Wd, act>,
so the expert outputs are never saved either. Routing (softmax, top-k) uses torch's own
kernels: they are a [T, E] sliver of the work; the routing backward is written out
(softmax and renormalization Jacobians) so the whole block is one autograd node.

Global-batch load balancing (Qwen3; Qiu et al. 2025, "Demons in the detail"): f_e, the
fraction of top-k selections that went to expert e, is counted over all micro-batches of
an optimizer step and all data-parallel ranks; P_e, the mean router probability, stays
local and carries the gradient. For the trainer (gradient accumulation over M micro-
batches, data-parallel group ``pg``)::

    counts = [expert_selection_counts(logits_m, E, K, mask_m) for each micro-batch m]
    f = global_expert_frequencies(torch.stack(counts).sum(0), group=pg)   # all-reduce
    lbl_m = global_load_balancing_loss(logits_m, f, mask_m)   # per micro-batch, backward

f needs the step's counts before the first backward, so either route every micro-batch
first (a no-grad router pass), or use the counts seen so far in the step (each micro-batch
all-reduces its running sum: the paper's buffered approximation). With one micro-batch on
one rank, ``global_load_balancing_loss`` equals HF's ``load_balancing_loss_func``.
Shapes: T tokens, H hidden, E experts, K top-k, I expert intermediate size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from qwen3_fast.ops import _backend, _checks, reference
from qwen3_fast.ops.grouped_gemm import grouped_gemm_forward, grouped_gemm_wgrad
from qwen3_fast.ops.moe_permute import (permute_rows, sort_by_expert, unpermute_rows)
from qwen3_fast.ops.silu_and_mul import silu_and_mul_backward, silu_and_mul_forward


def _check_top_k(top_k: object, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}] (the number of experts), "
                         f"got {top_k!r}")
    return top_k


def _check_logits(router_logits: object, name: str = "router_logits") -> Tensor:
    _checks.check_tensor(router_logits, name, ndim=2)
    if router_logits.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(router_logits.shape)}; expected [T, E], E > 0")
    return router_logits


# ------------------------------------------------------------------ routing
def _acc(dtype: torch.dtype) -> torch.dtype:
    """float32 math (HF), float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _route(router_logits: Tensor, top_k: int, norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    probs = torch.softmax(router_logits, dim=-1, dtype=_acc(router_logits.dtype))  # [T, E]
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids, probs


def _route_backward(d_weights: Optional[Tensor], d_probs: Optional[Tensor], probs: Tensor,
                    weights: Tensor, expert_ids: Tensor, norm: bool) -> Tensor:
    """d router_logits (float32) from d weights [T, K] and d probs [T, E]."""
    dp = torch.zeros_like(probs) if d_probs is None else d_probs.to(probs.dtype).clone()
    if d_weights is not None:
        dw = d_weights.to(probs.dtype)
        if norm:  # w_k = v_k / S, S = sum_j v_j  =>  dv_k = (dw_k - <dw, w>) / S
            top = probs.gather(1, expert_ids)
            dw = (dw - (dw * weights).sum(-1, keepdim=True)) / top.sum(-1, keepdim=True)
        dp.scatter_add_(1, expert_ids, dw)
    return probs * (dp - (dp * probs).sum(-1, keepdim=True))  # softmax Jacobian


@_backend.custom_op("qwen3_fast::moe_route_fwd")
def _moe_route_fwd(router_logits: Tensor, top_k: int, norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _route(router_logits, top_k, norm)


@_moe_route_fwd.register_fake
def _(router_logits, top_k, norm):
    t, e = router_logits.shape
    acc = _acc(router_logits.dtype)
    return router_logits.new_empty((t, top_k), dtype=acc), \
        router_logits.new_empty((t, top_k), dtype=torch.int64), \
        router_logits.new_empty((t, e), dtype=acc)


def _route_setup(ctx, inputs, output):
    router_logits, _, norm = inputs
    weights, expert_ids, probs = output
    ctx.mark_non_differentiable(expert_ids)
    # Outputs only ([T, K] and [T, E] floats): the backward needs no recomputation.
    ctx.save_for_backward(weights, expert_ids, probs)
    ctx.norm, ctx.dtype = norm, router_logits.dtype


def _route_bwd(ctx, d_weights, d_ids, d_probs):
    weights, expert_ids, probs = ctx.saved_tensors
    dl = _route_backward(d_weights, d_probs, probs, weights, expert_ids, ctx.norm)
    return dl.to(ctx.dtype), None, None


torch.library.register_autograd("qwen3_fast::moe_route_fwd", _route_bwd, setup_context=_route_setup)


def moe_route(router_logits: Tensor, top_k: int,
              norm_topk_prob: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax (fp32) over experts, top-k, optional renormalization.

    Parameters
    ----------
    router_logits : [T, E] float tensor
    top_k : K in [1, E];  norm_topk_prob : divide the top-k weights by their sum

    Returns
    -------
    weights [T, K] float32, expert_ids [T, K] int64, router_probs [T, E] float32;
    differentiable w.r.t. router_logits through weights and router_probs.
    """
    _check_logits(router_logits)
    _check_top_k(top_k, router_logits.shape[1])
    if router_logits.dtype == torch.float64 or _backend.resolve("moe", router_logits) == "reference":
        return reference.moe_route(router_logits, top_k, bool(norm_topk_prob))
    return _backend.call_op(_moe_route_fwd, router_logits, top_k, bool(norm_topk_prob))


# ------------------------------------------------------------------ experts, one backend
def moe_experts_forward(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                        top_k: int, norm: bool, backend: str):
    """-> (y [T, H], weights [T, K] f32, expert_ids [T, K], offsets [E+1], row_map [T*K],
    gate_up [T*K, 2I]); x, w_* contiguous."""
    e = w_gate_up.shape[0]
    weights, expert_ids, _ = _route(router_logits, top_k, norm)
    offsets, row_map = sort_by_expert(expert_ids, e, backend)
    x_sorted = permute_rows(x, row_map, top_k, None, backend)  # [T*K, H]
    gate_up = grouped_gemm_forward(x_sorted, w_gate_up, offsets, True, backend)  # [T*K, 2I]
    act = _silu(gate_up, backend)  # [T*K, I]
    y_sorted = grouped_gemm_forward(act, w_down, offsets, True, backend)  # [T*K, H]
    y = unpermute_rows(y_sorted, row_map, weights.reshape(-1), top_k, backend)  # [T, H]
    return y, weights, expert_ids, offsets, row_map, gate_up


def _silu(gate_up: Tensor, backend: str) -> Tensor:
    if backend == "reference" or gate_up.dtype == torch.float64:
        return reference.silu_and_mul(gate_up)
    return silu_and_mul_forward(gate_up, backend)


def _silu_backward(d_act: Tensor, gate_up: Tensor, backend: str) -> Tensor:
    if backend == "reference" or gate_up.dtype == torch.float64:
        g, u = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(g)
        return torch.cat([d_act * u * sig * (1 + g * (1 - sig)), d_act * g * sig], dim=-1)
    return silu_and_mul_backward(d_act, gate_up, backend)


def moe_experts_backward(dy: Tensor, x: Tensor, router_logits: Tensor, w_gate_up: Tensor,
                         w_down: Tensor, weights: Tensor, expert_ids: Tensor, offsets: Tensor,
                         row_map: Tensor, gate_up: Tensor, top_k: int, norm: bool,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx [T, H], d router_logits [T, E], d w_gate_up [E, 2I, H], d w_down [E, H, I])."""
    dy = dy.contiguous()
    e = w_gate_up.shape[0]
    slots = row_map.numel()
    # routing weight of each sorted row, rounded to the model dtype as in the forward
    w_sorted = torch.empty(slots, dtype=weights.dtype, device=x.device)
    w_sorted[row_map] = weights.reshape(-1)
    w_sorted = w_sorted.to(x.dtype).unsqueeze(1)  # [T*K, 1]
    x_sorted = permute_rows(x, row_map, top_k, None, backend)  # recomputed gather
    dy_sorted = permute_rows(dy, row_map, top_k, None, backend)  # [T*K, H], unweighted
    act = _silu(gate_up, backend)  # recomputed SwiGLU [T*K, I]
    g = grouped_gemm_forward(dy_sorted, w_down, offsets, False, backend)  # dy @ Wd: [T*K, I]
    # d weight = <dy, act @ Wd^T> = <dy @ Wd, act>, in float32
    acc = _acc(x.dtype)
    d_w_sorted = (g.to(acc) * act.to(acc)).sum(-1)
    d_weights = d_w_sorted[row_map].view(-1, top_k)
    d_w_down = grouped_gemm_wgrad(act * w_sorted, dy_sorted, offsets, True, e, backend)
    d_gate_up = _silu_backward(g * w_sorted, gate_up, backend)  # [T*K, 2I]
    d_w_gate_up = grouped_gemm_wgrad(x_sorted, d_gate_up, offsets, True, e, backend)
    dx_sorted = grouped_gemm_forward(d_gate_up, w_gate_up, offsets, False, backend)  # [T*K, H]
    dx = unpermute_rows(dx_sorted, row_map, None, top_k, backend)
    probs = torch.softmax(router_logits, dim=-1, dtype=_acc(router_logits.dtype))
    d_logits = _route_backward(d_weights, None, probs, weights, expert_ids, norm)
    return dx, d_logits.to(router_logits.dtype), d_w_gate_up, d_w_down


@_backend.custom_op("qwen3_fast::moe_experts_fwd")
def _moe_experts_fwd(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                     top_k: int, norm: bool, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return moe_experts_forward(x.contiguous(), router_logits, w_gate_up.contiguous(),
                               w_down.contiguous(), top_k, norm, backend)


@_moe_experts_fwd.register_fake
def _(x, router_logits, w_gate_up, w_down, top_k, norm, backend):
    t, h = x.shape
    e, i2 = w_gate_up.shape[0], w_gate_up.shape[1]
    i64 = dict(dtype=torch.int64)
    return (x.new_empty((t, h)), x.new_empty((t, top_k), dtype=_acc(router_logits.dtype)),
            x.new_empty((t, top_k), **i64), x.new_empty((e + 1,), **i64),
            x.new_empty((t * top_k,), **i64), x.new_empty((t * top_k, i2)))


@torch.library.custom_op("qwen3_fast::moe_experts_bwd", mutates_args=())
def _moe_experts_bwd(dy: Tensor, x: Tensor, router_logits: Tensor, w_gate_up: Tensor,
                     w_down: Tensor, weights: Tensor, expert_ids: Tensor, offsets: Tensor,
                     row_map: Tensor, gate_up: Tensor, top_k: int, norm: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return moe_experts_backward(dy, x.contiguous(), router_logits, w_gate_up.contiguous(),
                                w_down.contiguous(), weights, expert_ids, offsets, row_map,
                                gate_up, top_k, norm, backend)


@_moe_experts_bwd.register_fake
def _(dy, x, router_logits, w_gate_up, w_down, weights, expert_ids, offsets, row_map, gate_up,
      top_k, norm, backend):
    return (x.new_empty(x.shape), router_logits.new_empty(router_logits.shape),
            w_gate_up.new_empty(w_gate_up.shape), w_down.new_empty(w_down.shape))


def _experts_setup(ctx, inputs, output):
    x, router_logits, w_gate_up, w_down, top_k, norm, backend = inputs
    y, weights, expert_ids, offsets, row_map, gate_up = output
    ctx.mark_non_differentiable(weights, expert_ids, offsets, row_map, gate_up)
    # What is saved and why: see the module docstring (gate_up, routing state; x_sorted and
    # the activation are recomputed in the backward).
    ctx.save_for_backward(x, router_logits, w_gate_up, w_down, weights, expert_ids, offsets,
                          row_map, gate_up)
    ctx.top_k, ctx.norm, ctx.backend = top_k, norm, backend


def _experts_backward(ctx, dy, *unused):
    saved = ctx.saved_tensors
    dx, dl, dwgu, dwd = _moe_experts_bwd(dy, *saved, ctx.top_k, ctx.norm, ctx.backend)
    return dx, dl, dwgu, dwd, None, None, None


torch.library.register_autograd("qwen3_fast::moe_experts_fwd", _experts_backward,
                                setup_context=_experts_setup)


def moe_experts(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                top_k: int, norm_topk_prob: bool) -> Tensor:
    """Route each token to its top-k experts and sum their weighted SwiGLU outputs.

    Parameters
    ----------
    x : [T, H];  router_logits : [T, E] (any float dtype)
    w_gate_up : [E, 2I, H] (gate rows first);  w_down : [E, H, I]; both x's dtype and device
    top_k : K in [1, E];  norm_topk_prob : renormalize the top-k probabilities to sum 1

    Returns
    -------
    y [T, H] in x's dtype; differentiable w.r.t. x, router_logits, w_gate_up, w_down.
    """
    _checks.check_tensor(x, "x", ndim=2)
    _check_logits(router_logits)
    _checks.check_tensor(w_gate_up, "w_gate_up", ndim=3)
    _checks.check_tensor(w_down, "w_down", ndim=3)
    t, h = x.shape
    e = w_gate_up.shape[0]
    if router_logits.shape != (t, e):
        raise ValueError(f"router_logits has shape {tuple(router_logits.shape)}; expected "
                         f"[T, E] = [{t}, {e}] (E = w_gate_up's expert count)")
    if w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2 or w_gate_up.shape[1] == 0:
        raise ValueError(f"w_gate_up has shape {tuple(w_gate_up.shape)}; expected [E, 2I, {h}]")
    inter = w_gate_up.shape[1] // 2
    if w_down.shape != (e, h, inter):
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}; expected [{e}, {h}, {inter}]")
    for name, w in (("router_logits", router_logits), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        _checks.check_same_device(x, "x", w, name)
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _checks.check_same_dtype(x, "x", w, name)
    _check_top_k(top_k, e)
    if h == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected H > 0")
    backend = _backend.resolve("moe", x)
    if backend == "reference":
        return reference.moe_experts(x, router_logits, w_gate_up, w_down, top_k,
                                     bool(norm_topk_prob))
    return _backend.call_op(_moe_experts_fwd, x, router_logits, w_gate_up, w_down, top_k,
                            bool(norm_topk_prob), backend)[0]


# ------------------------------------------------------------------ load balancing
def _check_layers(router_logits_per_layer, num_experts: int, attention_mask) -> None:
    if isinstance(router_logits_per_layer, Tensor) or not router_logits_per_layer:
        raise ValueError("router_logits_per_layer must be a non-empty tuple/list of [B*S, E] "
                         "tensors, one per MoE layer")
    for i, t in enumerate(router_logits_per_layer):
        _check_logits(t, f"router_logits_per_layer[{i}]")
        if t.shape[1] != num_experts:
            raise ValueError(f"router_logits_per_layer[{i}] has {t.shape[1]} experts; expected "
                             f"num_experts={num_experts}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [B, S] tensor")
        n = attention_mask.numel()
        if any(t.shape[0] != n for t in router_logits_per_layer):
            raise ValueError(f"attention_mask has {n} positions ({tuple(attention_mask.shape)}); "
                             "expected each layer's router logits to have B*S rows")


def load_balancing_loss(router_logits_per_layer: Sequence[Tensor], num_experts: int, top_k: int,
                        attention_mask: Optional[Tensor] = None) -> Tensor:
    """HF's auxiliary load-balancing loss over all MoE layers (f and P from this batch).

    router_logits_per_layer : one [B*S, E] tensor per MoE layer (a tuple or list)
    attention_mask : optional [B, S] keep-mask; padding is left out of both factors
    Returns a scalar: E * sum_e f_e * P_e (= top_k for perfectly uniform routing).
    """
    _check_layers(router_logits_per_layer, num_experts, attention_mask)
    _check_top_k(top_k, num_experts)
    return reference.load_balancing_loss(tuple(router_logits_per_layer), num_experts, top_k,
                                         attention_mask)


def _stacked(router_logits_per_layer, attention_mask):
    """All layers' logits [L*B*S, E] (on the first layer's device) and the row keep-mask."""
    dev = router_logits_per_layer[0].device
    logits = torch.cat([t.to(dev) for t in router_logits_per_layer])
    if attention_mask is None:
        return logits, None
    keep = attention_mask.to(dev).reshape(-1).to(torch.float32)
    return logits, keep.repeat(len(router_logits_per_layer))


@torch.no_grad()
def expert_selection_counts(router_logits_per_layer: Sequence[Tensor], num_experts: int,
                            top_k: int, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Top-k selections per expert in one micro-batch (no grad).

    Returns counts [E+1] float64: counts[e] = number of (layer, token) rows that chose
    expert e among their top_k, counts[E] = number of (layer, token) rows counted (padding
    excluded). Sum these over micro-batches and ranks, then
    :func:`global_expert_frequencies`.
    """
    _check_layers(router_logits_per_layer, num_experts, attention_mask)
    _check_top_k(top_k, num_experts)
    logits, keep = _stacked(router_logits_per_layer, attention_mask)
    _, selected = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.float64, device=logits.device)
    rows = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device) if keep is None \
        else keep.to(torch.float64)
    counts[:num_experts].index_add_(0, selected.reshape(-1), rows.repeat_interleave(top_k))
    counts[num_experts] = rows.sum()
    return counts


@torch.no_grad()
def global_expert_frequencies(counts: Tensor | Sequence[Tensor], group=None) -> Tensor:
    """f [E] float32 from summed selection counts, all-reduced over a process group.

    counts : one [E+1] tensor from :func:`expert_selection_counts` or a sequence of them
        (micro-batches; summed here)
    group : torch.distributed process group (the data-parallel one); when
        torch.distributed is initialized the counts are all-reduced (SUM) over it (None =
        the default group); otherwise this rank's counts are used as they are.
    f_e = selections of e / counted rows, so sum_e f_e = top_k.
    """
    if not isinstance(counts, Tensor):
        if not counts:
            raise ValueError("counts must be an [E+1] tensor or a non-empty sequence of them")
        counts = torch.stack(list(counts)).sum(0)
    _checks.check_tensor(counts, "counts", ndim=1)
    if counts.shape[0] < 2:
        raise ValueError(f"counts has shape {tuple(counts.shape)}; expected [E+1], E >= 1")
    total = counts.to(torch.float64).clone()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    rows = total[-1].clamp_min(1.0)
    return (total[:-1] / rows).to(torch.float32)


def global_load_balancing_loss(router_logits_per_layer: Sequence[Tensor], frequencies: Tensor,
                               attention_mask: Optional[Tensor] = None) -> Tensor:
    """E * sum_e f_e * P_e with f global (no grad) and P_e the local mean router probability.

    router_logits_per_layer : one [B*S, E] tensor per MoE layer (this micro-batch)
    frequencies : f [E] from :func:`global_expert_frequencies`
    attention_mask : optional [B, S]; padding is left out of P
    Returns a float32 scalar, differentiable w.r.t. the logits. With f from this
    micro-batch alone it equals HF's ``load_balancing_loss_func``.
    """
    _checks.check_tensor(frequencies, "frequencies", ndim=1)
    num_experts = frequencies.shape[0]
    _check_layers(router_logits_per_layer, num_experts, attention_mask)
    logits, keep = _stacked(router_logits_per_layer, attention_mask)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
    if keep is None:
        p = probs.mean(0)
    else:
        p = (probs * keep.unsqueeze(1)).sum(0) / keep.sum().clamp_min(1.0)
    return num_experts * (frequencies.detach().to(p.device, torch.float32) * p).sum()
