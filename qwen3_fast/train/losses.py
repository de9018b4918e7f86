"""Auxiliary training losses of the pre-training stages: the MoE load-balancing loss.

:class:`MoeBalance` is THE place where the load-balancing loss enters training (the
trainer calls ``start_step()`` once per optimizer step and the object once per micro-step).

- ``global_batch`` (Qwen3; the default): f_e, the fraction of top-k selections that went
  to expert e, is counted over the optimizer step's micro-batches on all data-parallel
  ranks (ops.expert_selection_counts + ops.global_expert_frequencies, which all-reduces);
  P_e, the mean router probability, stays local and carries the gradient
  (ops.global_load_balancing_loss). Micro-step m uses the counts of micro-steps 1..m (the
  buffered approximation of Qiu et al. 2025): exact with one micro-step, and it needs no
  extra router pass. With one micro-step on one rank it equals HF's loss.
- ``micro_batch``: HF's ``load_balancing_loss_func`` per micro-batch (the model's aux_loss).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from qwen3_fast import ops

MODES = ("global_batch", "micro_batch")


class MoeBalance:
    """Unscaled load-balancing loss per micro-step (the trainer applies the coefficient)."""

    def __init__(self, mode: str, config):
        if mode not in MODES:
            raise ValueError(f"moe_balance must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.counts: Optional[Tensor] = None  # [E+1] float64, this step's selections so far

    def start_step(self) -> None:
        self.counts = None

    def __call__(self, out) -> Tensor:
        """`out`: the CausalLMOutput of a forward with ``output_router_logits=True``."""
        if self.mode == "micro_batch":
            if out.aux_loss is None:
                raise ValueError(f"an MoE model ({self.num_experts} experts) returned no "
                                 "aux_loss; call it with output_router_logits=True")
            return out.aux_loss
        if not out.router_logits:
            raise ValueError("an MoE model returned no router logits; call it with "
                             "output_router_logits=True")
        counts = ops.expert_selection_counts(out.router_logits, self.num_experts, self.top_k)
        self.counts = counts if self.counts is None else self.counts + counts
        freqs = ops.global_expert_frequencies(self.counts)  # all-reduced over the ranks
        return ops.global_load_balancing_loss(out.router_logits, freqs)


__all__ = ["MODES", "MoeBalance"]
