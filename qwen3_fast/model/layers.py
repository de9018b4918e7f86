"""Qwen3 decoder building blocks: attention (QK-norm, RoPE, GQA), SwiGLU MLP, decoder layer.

Every norm, activation, RoPE and attention call goes through :mod:`qwen3_fast.ops`, so
kernels plug in without touching this file. Parameter names are HF's
(``self_attn.{q,k,v,o}_proj``, ``q_norm``, ``k_norm``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``).

Departure from HF: the residual add is fused with the next RMSNorm (``ops.add_rms_norm``),
so a layer takes and returns ``(hidden, residual)``; the sums are the same additions HF does.
Shapes: B batch, S sequence, H hidden, Hq/Hkv heads, D head_dim, I intermediate.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from qwen3_fast import ops
from qwen3_fast.model.config import Qwen3Config
from qwen3_fast.model.moe import Qwen3SparseMoeBlock
from qwen3_fast.ops.attention import attention
from qwen3_fast.ops.rope import qk_norm_rope


def project(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a projection, through ops.linear (the skinny bf16 CPU decode kernel)
    when the module is a plain bias-free nn.Linear without hooks; anything else (a bias,
    a subclass or wrapper such as LoRA, hooks) runs the module itself, and so does a
    weight of another dtype than x (autocast: custom ops are not autocast, nn.Linear is)."""
    if (type(module) is nn.Linear and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks and module.weight.dtype == x.dtype):
        return ops.linear(x, module.weight)
    return module(x)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        h, d, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.q_norm = ops.RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = ops.RMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                attention_mask: Optional[Tensor], cache=None, precision: int = 16,
                document_ids: Optional[Tensor] = None) -> Tensor:
        # x: [B, S, H]; cos/sin: [P, D] fp32; positions: [B, S]; attention_mask: [B, S] or None
        # cache: a qwen3_fast.cache cache whose begin_step already reserved this step's tokens
        b, s, _ = x.shape
        q = project(self.q_proj, x).view(b, s, self.num_heads, self.head_dim)  # [B, S, Hq, D]
        k = project(self.k_proj, x).view(b, s, self.num_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = project(self.v_proj, x).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, positions,
                            self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if cache is not None:
            cache.write(self.layer_idx, k, v)
        if cache is None or cache.is_empty_before_step():
            # prefill: SDPA over this step's keys (causal, GQA, padding mask)
            # document_ids [B, S] (packed training rows): attention stays in each document
            o = attention(q, k, v, causal=True, attention_mask=attention_mask,
                          scale=self.scaling, document_ids=document_ids)  # [B, Hq, S, D]
        elif getattr(cache, "device_step", False):
            # a device-side decode step (generate/graph_step.py): the step's cache view
            # attends at the lengths on the device, with no host read
            o = cache.attend(q.contiguous(), self.layer_idx, self.scaling)
        else:
            # decode (S = 1) or verify / chunked prefill (S > 1, causal among the new tokens)
            o = ops.flash_decode(q.contiguous(), cache, self.layer_idx, precision,
                                 scale=self.scaling)
        return project(self.o_proj, o.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config, intermediate_size: Optional[int] = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        # int4 copies for the speculative draft (model/quant.py: attach_draft_weights), used
        # inside `with draft_weights(model):` only
        self.draft_gate_up: Optional[nn.Module] = None
        self.draft_down: Optional[nn.Module] = None
        self.use_draft = False

    def forward(self, x: Tensor) -> Tensor:
        if self.use_draft:
            return self.draft_down(ops.silu_and_mul(self.draft_gate_up(x)))
        gate_up = torch.cat((project(self.gate_proj, x), project(self.up_proj, x)),
                            dim=-1)  # [..., 2I]
        return project(self.down_proj, ops.silu_and_mul(gate_up))


def _like(x: Tensor, residual: Tensor) -> Tensor:
    """Under autocast a sublayer returns bf16 while the residual stream stays fp32 (the
    embeddings' dtype); HF's ``residual + x`` promotes to fp32, so do the same."""
    return x if x.dtype == residual.dtype else x.to(residual.dtype)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.is_sparse = config.is_sparse_layer(layer_idx)
        self.mlp = Qwen3SparseMoeBlock(config) if self.is_sparse else Qwen3MLP(config)
        self.input_layernorm = ops.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ops.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: Tensor, residual: Optional[Tensor], cos: Tensor, sin: Tensor,
                positions: Tensor, attention_mask: Optional[Tensor], cache=None,
                precision: int = 16, document_ids: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """x: previous sublayer output [B, S, H] (the embeddings when residual is None).

        Returns (mlp output, residual stream, router logits [B*S, E] or None).
        """
        eps = self.input_layernorm.variance_epsilon
        if residual is None:
            residual = x
            h = ops.rms_norm(x, self.input_layernorm.weight, eps)
        else:
            h, residual = ops.add_rms_norm(_like(x, residual), residual,
                                           self.input_layernorm.weight, eps)
        h = self.self_attn(h, cos, sin, positions, attention_mask, cache, precision,
                           document_ids)
        h, residual = ops.add_rms_norm(_like(h, residual), residual,
                                       self.post_attention_layernorm.weight,
                                       self.post_attention_layernorm.variance_epsilon)
        router_logits = None
        if self.is_sparse:
            h, router_logits = self.mlp(h)
        else:
            h = self.mlp(h)
        return h, residual, router_logits
