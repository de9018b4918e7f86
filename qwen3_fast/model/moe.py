"""Qwen3-MoE sparse block: router (``mlp.gate``) and stacked experts (``mlp.experts``).

Expert weights are held stacked for grouped GEMM: ``experts.gate_up_proj`` [E, 2I, H]
(gate rows then up rows) and ``experts.down_proj`` [E, H, I], the in-memory layout of
transformers 5. HF checkpoints on disk keep per-expert keys
``mlp.experts.{e}.{gate,up,down}_proj.weight``; model/checkpoint.py converts both ways.
Routing and expert math run in :func:`qwen3_fast.ops.moe.moe_experts`, one fused autograd op
(route, permute, grouped GEMMs, SwiGLU, combine) that matches HF's expert loop.
Shapes: T tokens, H hidden, E experts, I moe_intermediate_size.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qwen3_fast.model.config import Qwen3Config
from qwen3_fast.ops.moe import moe_experts


class Qwen3MoeExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size,
                                                     hidden_size))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size,
                                                  intermediate_size))  # [E, H, I]

    def extra_repr(self) -> str:
        e, i2, h = self.gate_up_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={i2 // 2}"


class Qwen3SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Qwen3MoeExperts(config.num_experts, config.hidden_size,
                                       config.moe_intermediate_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, S, H] -> (y: [B, S, H], router_logits: [B*S, E])
        flat = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(flat)
        y = moe_experts(flat, router_logits, self.experts.gate_up_proj, self.experts.down_proj,
                        self.top_k, self.norm_topk_prob)
        return y.view_as(x), router_logits
