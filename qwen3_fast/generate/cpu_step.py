"""A CPU decode step whose decoder layers run in one C++ call (csrc/cpu/decode_layers.cpp).

The eager step (``model(tokens, cache=cache)``) spends ~35 us of Python on each of the ~14
kernel calls per layer: ~15 ms of Qwen3-0.6B's ~70 ms batch-1 step on the 2-core CI machine,
where the rest is the weight read itself. :func:`decode_logits` runs the same step with the
layer loop in C++: the embedding lookup and the LM head stay in Python (``project``, as in
the model), everything between them is one ``decode_layers_cpu`` call that makes the same
kernel calls, in the same order, with the same thread counts. The logits are bitwise the
eager step's (python_tests/generate/test_cpu_step.py), so nothing downstream can tell.

It applies (:func:`unsupported_reason` returns None) to eager inference on the CPU of a
bf16 model whose layers are all dense, with plain bias-free ``nn.Linear`` projections and
``ops.RMSNorm`` norms, no module hooks, over a bf16 :class:`~qwen3_fast.cache.DenseKVCache`,
1-16 sequences (the skinny linear kernel's rows), the default (or forced "cpu") backend,
and nothing that needs torch's dispatcher (autograd, the profiler, torch.compile, dispatch
modes: the eager ops would route through it and be seen there). Anything else - MoE
layers, the int8 cache, LoRA wrappers, fp32 models - takes the eager model, unchanged.

The engine's ``decode_step`` uses it by default; ``QWEN3_FAST_CPU_STEP=0`` turns it off
(A/B measurements, debugging).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from qwen3_fast import _ext
from qwen3_fast.cache import DenseKVCache
from qwen3_fast.model.layers import Qwen3MLP, project
from qwen3_fast.ops import _backend
from qwen3_fast.ops._kernel_args import UNCAPPED_STREAM_BYTES, cpu_threads
from qwen3_fast.ops.linear import MAX_KERNEL_ROWS
from qwen3_fast.ops.rms_norm import RMSNorm


def enabled() -> bool:
    """False when ``QWEN3_FAST_CPU_STEP=0`` is set (the eager model then decodes)."""
    return os.environ.get("QWEN3_FAST_CPU_STEP", "1") != "0"


def _plain_linear(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.bfloat16
            and m.weight.is_contiguous())


def _layer_weights(layer) -> Optional[list[Tensor]]:
    """The layer's 11 weights in decode_layers_bf16's table order, or None if its structure
    is not the plain dense one the C++ loop reproduces."""
    attn, mlp = layer.self_attn, layer.mlp
    if layer.is_sparse or type(mlp) is not Qwen3MLP or mlp.use_draft:
        return None
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
               mlp.down_proj)
    norms = (layer.input_layernorm, attn.q_norm, attn.k_norm, layer.post_attention_layernorm)
    if not all(_plain_linear(m) for m in linears):
        return None
    h, qd, kvd = attn.o_proj.weight.shape[0], attn.num_heads * attn.head_dim, \
        attn.num_kv_heads * attn.head_dim
    inter = mlp.gate_proj.weight.shape[0]
    shapes = [(m.weight.shape[0], m.weight.shape[1]) for m in linears]
    if shapes != [(qd, h), (kvd, h), (kvd, h), (h, qd), (inter, h), (inter, h), (h, inter)]:
        return None
    if not all(type(n) is RMSNorm and n.weight.dtype == torch.bfloat16 for n in norms):
        return None
    return [layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight,
            attn.v_proj.weight, attn.q_norm.weight, attn.k_norm.weight, attn.o_proj.weight,
            layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
            mlp.down_proj.weight]


def _hooked(model: nn.Module) -> bool:
    if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def unsupported_reason(model, cache, batch: int) -> Optional[str]:
    """None when :func:`decode_logits` can run this step, else why not (for tests/logs)."""
    if not enabled():
        return "QWEN3_FAST_CPU_STEP=0"
    if not (_ext.available() and hasattr(_ext.extension(), "decode_layers_cpu")):
        return "the extension has no decode_layers_cpu"
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "needs a bf16 model on the CPU"
    if type(cache) is not DenseKVCache or cache.dtype != torch.bfloat16:
        return "needs a bf16 DenseKVCache"
    if not 1 <= batch <= MAX_KERNEL_ROWS:
        return f"batch must be 1..{MAX_KERNEL_ROWS}"
    if _backend.get_backend() not in (None, "cpu"):
        return f"backend {_backend.get_backend()!r} is forced"
    if torch.is_grad_enabled() or _backend.dispatch_needed(()):
        return "grad mode, the profiler, torch.compile or a dispatch mode is active"
    cfg = model.config
    inner = model.model
    eps = cfg.rms_norm_eps
    if cfg.num_hidden_layers == 0 or cfg.attention_bias:
        return "no layers or attention biases"
    if type(inner.norm) is not RMSNorm or inner.norm.weight.dtype != torch.bfloat16:
        return "the final norm is not a bf16 RMSNorm"
    if _hooked(model):
        return "a module has forward hooks"
    for layer in inner.layers:
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm,
                 layer.self_attn.k_norm)
        if any(getattr(n, "variance_epsilon", None) != eps for n in norms):
            return "a norm's epsilon differs from config.rms_norm_eps"
        if _layer_weights(layer) is None:
            return f"layer {layer.layer_idx} is not a plain dense bf16 layer"
        if (layer.mlp.gate_proj.weight.shape[0] != cfg.intermediate_size
                or layer.self_attn.o_proj.weight.shape[0] != cfg.hidden_size):
            return f"layer {layer.layer_idx} does not have the config's sizes"
    if inner.norm.variance_epsilon != eps:
        return "the final norm's epsilon differs from config.rms_norm_eps"
    return None


def decode_logits(model, tokens: Tensor, cache) -> Tensor:
    """tokens [B] -> next-token logits [B, V], bitwise ``model(tokens.view(-1, 1),
    cache=cache).logits[:, -1]``; the caller checked :func:`unsupported_reason`."""
    cfg = model.config
    inner = model.model
    b = tokens.shape[0]
    input_ids = tokens.view(b, 1)
    _, positions, _ = inner._begin_cache_step(cache, input_ids, None, None, None)
    cos, sin = inner.rope_tables(int(positions.max()) + 1, input_ids.device)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # as qk_norm_rope reads them
    x = inner.embed_tokens(input_ids).view(b, cfg.hidden_size).contiguous()
    table = torch.tensor([[w.data_ptr() for w in _layer_weights(layer)] for layer in inner.layers],
                         dtype=torch.int64)
    out = torch.empty_like(x)
    _ext.extension().decode_layers_cpu(
        x.data_ptr(), table.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(),
        cache.lengths.data_ptr(), cos.data_ptr(), sin.data_ptr(), inner.norm.weight.data_ptr(),
        out.data_ptr(), b, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
        cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cache.max_length,
        cos.shape[0], float(cfg.rms_norm_eps), float(cfg.head_dim ** -0.5),
        cpu_threads(UNCAPPED_STREAM_BYTES), cpu_threads(0), UNCAPPED_STREAM_BYTES)
    return project(model.lm_head, out.view(b, 1, cfg.hidden_size))[:, -1]
