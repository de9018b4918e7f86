"""A CPU decode step whose decoder layers run in one C++ call (csrc/cpu/decode_layers.cpp).

The eager step (``model(tokens, cache=cache)``) spends ~35 us of Python on each of the ~14
kernel calls per layer: ~15 ms of Qwen3-0.6B's ~70 ms batch-1 step on the 2-core CI machine,
where the rest is the weight read itself. :func:`decode_logits` runs the same step with the
layer loop in C++: the embedding lookup and the LM head stay in Python (``project``, as in
the model), everything between them is one ``decode_layers_cpu`` call that makes the same
kernel calls, in the same order, with the same thread counts. The logits and the cache it
leaves are bitwise the eager step's (python_tests/generate/test_cpu_step.py), so nothing
downstream can tell.

It applies (:func:`unsupported_reason` returns None) to eager inference on the CPU of a
bf16 model whose layers are all dense, with plain bias-free ``nn.Linear`` projections and
``ops.RMSNorm`` norms, no forward hooks, over a bf16 :class:`~qwen3_fast.cache.DenseKVCache`
or :class:`~qwen3_fast.cache.HierarchicalKVCache` (read at 8 or 4 bits; not in the one step
in G where a group leaves the full-precision ring and is quantized), 1-16 token rows
(sequences x new tokens: the skinny linear kernel's rows), a non-empty cache, the default
(or forced "cpu") backend, and nothing that needs torch's dispatcher (autograd, the
profiler, torch.compile, dispatch modes: the eager ops would route through it and be seen
there). Anything else - MoE layers, LoRA wrappers, fp32 models, the int4 draft weights, a
prefill - takes the eager model.

Users: the engine's ``decode_step`` (plain decoding, both caches) and the speculative draft
and verify passes (generate/speculative.py). ``QWEN3_FAST_CPU_STEP=0`` turns it off (A/B
measurements, debugging).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from qwen3_fast import _ext
from qwen3_fast.cache import DenseKVCache, HierarchicalKVCache
from qwen3_fast.model.layers import Qwen3MLP, project
from qwen3_fast.ops import _backend
from qwen3_fast.ops._kernel_args import UNCAPPED_STREAM_BYTES, cpu_threads
from qwen3_fast.ops.linear import MAX_KERNEL_ROWS
from qwen3_fast.ops.rms_norm import RMSNorm


def enabled() -> bool:
    """False when ``QWEN3_FAST_CPU_STEP=0`` is set (the eager model then decodes)."""
    return os.environ.get("QWEN3_FAST_CPU_STEP", "1") != "0"


# The structure walk below reads nn.Module's _modules / _parameters dicts directly: the
# attribute path (nn.Module.__getattr__, model.modules()) cost ~3 ms per step for
# Qwen3-0.6B's 28 layers, and the walk runs every step (a model may change between steps).
def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _linear_weight(m: nn.Module, rows: int, cols: int) -> Optional[Tensor]:
    """A plain bias-free nn.Linear's bf16 contiguous [rows, cols] weight, else None."""
    if type(m) is not nn.Linear or _hooked(m) or m._parameters.get("bias") is not None:
        return None
    w = m._parameters["weight"]
    if w.dtype != torch.bfloat16 or tuple(w.shape) != (rows, cols) or not w.is_contiguous():
        return None
    return w


def _norm_weight(m: nn.Module, size: int, eps: float) -> Optional[Tensor]:
    if type(m) is not RMSNorm or _hooked(m) or m.variance_epsilon != eps:
        return None
    w = m._parameters["weight"]
    return w if w.dtype == torch.bfloat16 and tuple(w.shape) == (size,) else None


def _layer_weights(layer, cfg) -> Optional[list[Tensor]]:
    """The layer's 11 weights in decode_layers_bf16's table order, or None if it is not the
    plain dense bf16 layer (config sizes, no hooks) the C++ loop reproduces."""
    mods = layer._modules
    attn, mlp = mods["self_attn"], mods["mlp"]
    if (layer.is_sparse or type(mlp) is not Qwen3MLP or mlp.use_draft or _hooked(layer)
            or _hooked(attn) or _hooked(mlp)):
        return None
    h, d, i, eps = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps
    qd, kvd = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    a, m = attn._modules, mlp._modules
    weights = [_norm_weight(mods["input_layernorm"], h, eps),
               _linear_weight(a["q_proj"], qd, h), _linear_weight(a["k_proj"], kvd, h),
               _linear_weight(a["v_proj"], kvd, h), _norm_weight(a["q_norm"], d, eps),
               _norm_weight(a["k_norm"], d, eps), _linear_weight(a["o_proj"], h, qd),
               _norm_weight(mods["post_attention_layernorm"], h, eps),
               _linear_weight(m["gate_proj"], i, h), _linear_weight(m["up_proj"], i, h),
               _linear_weight(m["down_proj"], h, i)]
    return None if any(w is None for w in weights) else weights


def _table(model) -> "str | Tensor":
    """int64 [layers, 11] weight pointers for decode_layers_cpu, or why the model is not one
    it reproduces."""
    cfg = model.config
    inner = model._modules["model"]
    if cfg.num_hidden_layers == 0 or cfg.attention_bias:
        return "no layers or attention biases"
    if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
            or _hooked(model) or _hooked(inner)):
        return "forward hooks are registered"
    if _norm_weight(inner._modules["norm"], cfg.hidden_size, cfg.rms_norm_eps) is None:
        return "the final norm is not a plain bf16 RMSNorm with the config's epsilon"
    rows = []
    for layer in inner._modules["layers"]._modules.values():
        weights = _layer_weights(layer, cfg)
        if weights is None:
            return (f"layer {layer.layer_idx} is not a plain dense bf16 layer (MoE, a wrapped "
                    "or hooked module, another dtype or epsilon)")
        rows.append([w.data_ptr() for w in weights])
    return torch.tensor(rows, dtype=torch.int64)


def _check(model, cache, batch: int, n: int, precision: Optional[int]) -> "str | Tensor":
    """The weight table for a step of `n` tokens for each of `batch` sequences, or why the
    one-call step does not apply."""
    if not enabled():
        return "QWEN3_FAST_CPU_STEP=0"
    if not (_ext.available() and hasattr(_ext.extension(), "decode_layers_cpu")):
        return "the extension has no decode_layers_cpu"
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "needs a bf16 model on the CPU"
    if type(cache) is DenseKVCache:
        if precision not in (None, 16):
            return f"precision {precision} on a dense cache"
    elif type(cache) is HierarchicalKVCache:
        if precision not in (None, 8, 4):
            return f"precision {precision} on a hierarchical cache"
        if cache.step_quantizes(n):
            return "this step quantizes a group of the hierarchical cache (the eager write does)"
    else:
        return "needs a DenseKVCache or a HierarchicalKVCache"
    if cache.dtype != torch.bfloat16:
        return "needs a bf16 cache"
    if not (1 <= batch and 1 <= n and batch * n <= MAX_KERNEL_ROWS):
        return f"batch * new tokens must be 1..{MAX_KERNEL_ROWS}"
    if not any(cache.seq_lengths()):
        return "an empty cache: the step is a prefill (the eager model's SDPA path)"
    if _backend.get_backend() not in (None, "cpu"):
        return f"backend {_backend.get_backend()!r} is forced"
    if torch.is_grad_enabled() or _backend.dispatch_needed(()):
        return "grad mode, the profiler, torch.compile or a dispatch mode is active"
    return _table(model)


def unsupported_reason(model, cache, batch: int, precision: Optional[int] = None,
                       n: int = 1) -> Optional[str]:
    """None when the one-call step can run `n` new tokens for each of `batch` sequences,
    else why not (for tests/logs)."""
    got = _check(model, cache, batch, n, precision)
    return got if isinstance(got, str) else None


def try_decode_logits(model, tokens: Tensor, cache, precision: Optional[int] = None
                      ) -> Optional[Tensor]:
    """tokens [B] -> :func:`decode_logits` [B, V] when the one-call step applies (see the
    module docstring), else None (the caller runs the eager model)."""
    table = _check(model, cache, tokens.shape[0], 1, precision)
    if isinstance(table, str):
        return None
    return _logits(model, tokens.view(-1, 1), cache, precision, table)[:, -1]


def try_verify_logits(model, tokens: Tensor, cache, precision: Optional[int] = None
                      ) -> Optional[Tensor]:
    """tokens [B, n] -> logits [B, n, V], bitwise ``model(tokens, cache=cache,
    precision=precision).logits`` (a speculative verify step), or None where the one-call
    step does not apply."""
    table = _check(model, cache, tokens.shape[0], tokens.shape[1], precision)
    return None if isinstance(table, str) else _logits(model, tokens, cache, precision, table)


_CACHE_TENSORS = ("k_buf", "v_buf", "k_u", "k_l", "k_min", "k_scale", "v_u", "v_l", "v_min",
                  "v_scale")


def _cache_args(cache) -> tuple:
    """(int64 [layers, 10] per-layer pointers as decode_layers_cpu takes them, n_quant
    pointer, ring, quant_tokens, group, value_group)."""
    if type(cache) is DenseKVCache:
        tensors = [cache.k, cache.v] + [None] * 8
        scalars = (0, cache.max_length, 0, 1, cache.head_dim)
    else:
        tensors = [getattr(cache, name) for name in _CACHE_TENSORS]
        scalars = (cache.n_quant.data_ptr(), cache.ring, cache.quant_capacity, cache.group_size,
                   cache.value_group)
    base = [(t.data_ptr(), t.stride(0) * t.element_size()) if t is not None else (0, 0)
            for t in tensors]
    rows = [[p + layer * st if p else 0 for p, st in base] for layer in range(cache.num_layers)]
    return (torch.tensor(rows, dtype=torch.int64), *scalars)


def decode_logits(model, tokens: Tensor, cache, precision: Optional[int] = None) -> Tensor:
    """tokens [B] -> next-token logits [B, V], bitwise ``model(tokens.view(-1, 1),
    cache=cache, precision=precision).logits[:, -1]``; ValueError (with the reason) where
    the one-call step does not apply (:func:`unsupported_reason`)."""
    table = _check(model, cache, tokens.shape[0], 1, precision)
    if isinstance(table, str):
        raise ValueError(f"decode_logits: {table}")
    return _logits(model, tokens.view(-1, 1), cache, precision, table)[:, -1]


def _logits(model, input_ids: Tensor, cache, precision: Optional[int], table: Tensor) -> Tensor:
    """input_ids [B, n] -> logits [B, n, V] through decode_layers_cpu (checked by _check)."""
    cfg = model.config
    inner = model.model
    b, n = input_ids.shape
    _, positions, precision = inner._begin_cache_step(cache, input_ids, None, None, precision)
    cos, sin = inner.rope_tables(int(positions.max()) + 1, input_ids.device)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # as qk_norm_rope reads them
    x = inner.embed_tokens(input_ids).view(b * n, cfg.hidden_size).contiguous()
    out = torch.empty_like(x)
    cache_table, n_quant, ring, quant_tokens, group, value_group = _cache_args(cache)
    _ext.extension().decode_layers_cpu(
        x.data_ptr(), table.data_ptr(), cache_table.data_ptr(), n_quant,
        cache.lengths.data_ptr(), cos.data_ptr(), sin.data_ptr(), inner.norm.weight.data_ptr(),
        out.data_ptr(), b, n, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
        cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, ring, quant_tokens, group,
        value_group, precision, cos.shape[0], float(cfg.rms_norm_eps),
        float(cfg.head_dim ** -0.5), cpu_threads(UNCAPPED_STREAM_BYTES), cpu_threads(0),
        UNCAPPED_STREAM_BYTES)
    return project(model.lm_head, out.view(b, n, cfg.hidden_size))
