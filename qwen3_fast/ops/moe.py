"""Mixture-of-experts ops: ``moe_route``, ``moe_experts``, ``load_balancing_loss``.

Exactly HF Qwen3-MoE: router softmax in fp32, top-k, divide by the top-k sum when
``norm_topk_prob``, routing weights cast to the activation dtype before the multiply.
Expert weights are stacked, ``w_gate_up`` [E, 2I, H] (gate rows then up rows) and
``w_down`` [E, H, I], the layout grouped-GEMM kernels want (and transformers 5's).
``load_balancing_loss`` equals HF's ``load_balancing_loss_func``.

Reference-backed for now (ops/reference.py: HF's expert loop); kernels come later behind
these names.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from qwen3_fast.ops import _checks, reference


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


def moe_route(router_logits: Tensor, top_k: int,
              norm_topk_prob: bool) -> tuple[Tensor, Tensor, Tensor]:
    """router_logits [T, E] -> (weights [T, K] fp32, expert_ids [T, K] int64, probs [T, E] fp32)."""
    _check_logits(router_logits)
    _check_top_k(top_k, router_logits.shape[1])
    return reference.moe_route(router_logits, top_k, bool(norm_topk_prob))


def moe_experts(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                top_k: int, norm_topk_prob: bool) -> Tensor:
    """Route each token to its top-k experts and sum their SwiGLU outputs.

    Parameters
    ----------
    x : [T, H];  router_logits : [T, E]
    w_gate_up : [E, 2I, H] (gate rows first);  w_down : [E, H, I]; both x's dtype and device
    top_k : K in [1, E];  norm_topk_prob : renormalize the top-k probabilities to sum 1

    Returns y [T, H] in x's dtype.
    """
    _checks.check_tensor(x, "x", ndim=2)
    _check_logits(router_logits)
    _checks.check_tensor(w_gate_up, "w_gate_up", ndim=3)
    _checks.check_tensor(w_down, "w_down", ndim=3)
    t, h = x.shape
    e = w_gate_up.shape[0]
    if router_logits.shape != (t, e):
        raise ValueError(f"router_logits has shape {tuple(router_logits.shape)}; expected "
                         f"[T, E] = [{t}, {e}]")
    if w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up has shape {tuple(w_gate_up.shape)}; expected [E, 2I, {h}]")
    inter = w_gate_up.shape[1] // 2
    if w_down.shape != (e, h, inter):
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}; expected [{e}, {h}, {inter}]")
    for name, w in (("router_logits", router_logits), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        _checks.check_same_device(x, "x", w, name)
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _checks.check_same_dtype(x, "x", w, name)
    _check_top_k(top_k, e)
    return reference.moe_experts(x, router_logits, w_gate_up, w_down, top_k, bool(norm_topk_prob))


def load_balancing_loss(router_logits_per_layer: Sequence[Tensor], num_experts: int, top_k: int,
                        attention_mask: Optional[Tensor] = None) -> Tensor:
    """HF's auxiliary load-balancing loss over all MoE layers.

    router_logits_per_layer : one [B*S, E] tensor per MoE layer (a tuple or list)
    attention_mask : optional [B, S] keep-mask; padding is left out of both factors
    Returns a scalar: E * sum_e f_e * P_e (= top_k for perfectly uniform routing).
    """
    if isinstance(router_logits_per_layer, Tensor) or not router_logits_per_layer:
        raise ValueError("router_logits_per_layer must be a non-empty tuple/list of [B*S, E] "
                         "tensors, one per MoE layer")
    for i, t in enumerate(router_logits_per_layer):
        _check_logits(t, f"router_logits_per_layer[{i}]")
        if t.shape[1] != num_experts:
            raise ValueError(f"router_logits_per_layer[{i}] has {t.shape[1]} experts; expected "
                             f"num_experts={num_experts}")
    _check_top_k(top_k, num_experts)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [B, S] tensor")
        n = attention_mask.numel()
        if any(t.shape[0] != n for t in router_logits_per_layer):
            raise ValueError(f"attention_mask has {n} positions ({tuple(attention_mask.shape)}); "
                             "expected each layer's router logits to have B*S rows")
    return reference.load_balancing_loss(tuple(router_logits_per_layer), num_experts, top_k,
                                         attention_mask)
