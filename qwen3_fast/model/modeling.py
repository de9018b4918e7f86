"""Qwen3ForCausalLM: the dense and MoE Qwen3 language model (``Qwen3MoeForCausalLM`` alias).

Owns the module tree with HF state-dict names (``model.embed_tokens``, ``model.layers.N...``,
``model.norm``, ``lm_head``; MoE experts stacked as ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj``), the forward pass, the shifted cross-entropy loss and the MoE
load-balancing loss. Checkpoint I/O lives in model/checkpoint.py.

Matches HF transformers 4.57 (logits, loss, aux_loss) including its position rule: without
``position_ids``, positions are 0..S-1 for every row, also for left-padded rows (HF does not
derive positions from the mask); pass ``position_ids`` to shift them. ``aux_loss`` is HF's
unscaled load-balancing loss; ``loss`` gets ``router_aux_loss_coef * aux_loss`` added when
labels are given and router logits are requested. Departures: RoPE tables are built once
per device and grown on demand; the KV cache is a qwen3_fast.cache object (the engine owns
it, :meth:`Qwen3ForCausalLM.new_cache` builds one) passed as ``cache=``.

KV cache path (one code path for prefill and decode): ``forward(ids, cache=cache)`` reserves
the step's tokens in the cache (``begin_step``), every attention layer writes its keys and
values, then attends with torch SDPA when the cache was empty before the step (prefill:
causal, GQA, padding mask) or with ``ops.flash_decode`` otherwise (decode, n = 1; verify or
chunked prefill, n > 1). Positions default to each sequence's cached length + 0..S-1.
Batched prefill of ragged prompts uses RIGHT padding: ``attention_mask`` row b is
counts[b] ones then zeros, and only those tokens enter the cache; later steps add the same
number of tokens to every sequence (no mask).

    model = Qwen3ForCausalLM.from_pretrained("path/to/Qwen3-0.6B", dtype=torch.bfloat16)
    out = model(input_ids, attention_mask=mask, labels=input_ids)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen3_fast import ops
from qwen3_fast.model.config import Qwen3Config
from qwen3_fast.model.layers import Qwen3DecoderLayer, project
from qwen3_fast.model.moe import Qwen3MoeExperts
from qwen3_fast.ops.moe import load_balancing_loss
from qwen3_fast.ops.rope import rope_cache

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: Optional[Tensor]  # [B, S, V] (or the last logits_to_keep); None: return_logits=False
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None  # MoE: HF load-balancing loss (unscaled)
    router_logits: Optional[tuple] = None  # MoE: one [B*S, E] per sparse layer
    hidden_states: Optional[Tensor] = None  # final normed hidden states [B, S, H]


class Qwen3Model(nn.Module):
    """Embeddings, decoder layers and the final norm (HF ``Qwen3Model``)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = ops.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._rope: Optional[tuple] = None  # (device, cos [P, D], sin [P, D]) fp32

    def rope_tables(self, needed: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin [P >= needed, D] fp32 on `device`, built once and grown on demand.

        Growth is geometric (at least double, up to max_position_embeddings): decoding past
        the table one position per step would otherwise rebuild all of it every step
        (16 ms at 32K positions on the CPU, more than a small model's whole step)."""
        cached = self._rope
        if cached is None or cached[0] != device or cached[1].shape[0] < needed:
            old = cached[1].shape[0] if cached is not None and cached[0] == device else 0
            size = max(needed, min(self.config.max_position_embeddings, max(4096, 2 * old)))
            # built as normal tensors even when the first call is an engine's inference_mode
            # rollout: a cached inference tensor could not be saved for a later backward (GRPO)
            with torch.inference_mode(False):
                cos, sin = rope_cache(self.config, size, device=device)
            self._rope = cached = (device, cos, sin)
        return cached[1], cached[2]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache=None,
                precision: Optional[int] = None,
                document_ids: Optional[Tensor] = None) -> tuple[Tensor, list]:
        # input_ids: [B, S] -> (hidden [B, S, H], router logits per sparse layer)
        # document_ids: [B, S] packed-document index per token (training; no cache)
        b, s = input_ids.shape
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids (packed documents) cannot be used with a cache")
        if cache is not None:
            attention_mask, position_ids, precision = self._begin_cache_step(
                cache, input_ids, attention_mask, position_ids, precision)
        else:
            precision = 16
        if position_ids is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
            needed = s
        else:
            positions = position_ids.to(input_ids.device).expand(b, s)
            needed = int(positions.max()) + 1 if positions.numel() else 1
            if positions.numel() and int(positions.min()) < 0:
                raise ValueError("position_ids must be >= 0")
        cos, sin = self.rope_tables(needed, input_ids.device)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # HF drops an all-ones mask and runs plain causal attention
        x = self.embed_tokens(input_ids)
        residual = None
        router_logits = []
        for layer in self.layers:
            x, residual, logits = layer(x, residual, cos, sin, positions, attention_mask,
                                        cache, precision, document_ids)
            if logits is not None:
                router_logits.append(logits)
        if residual is None:  # no layers
            return ops.rms_norm(x, self.norm.weight, self.norm.variance_epsilon), router_logits
        if x.dtype != residual.dtype:  # autocast: promote like HF's residual add (layers._like)
            x = x.to(residual.dtype)
        x, _ = ops.add_rms_norm(x, residual, self.norm.weight, self.norm.variance_epsilon)
        return x, router_logits


    def _begin_cache_step(self, cache, input_ids: Tensor, attention_mask: Optional[Tensor],
                          position_ids: Optional[Tensor], precision: Optional[int]):
        """Reserve this step's tokens in `cache`; returns (mask, positions, precision)."""
        b, s = input_ids.shape
        cfg = self.config
        if (cache.num_layers, cache.batch_size, cache.num_kv_heads, cache.head_dim) != \
                (cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim):
            raise ValueError(
                f"cache has (layers, batch, kv heads, head_dim) = ({cache.num_layers}, "
                f"{cache.batch_size}, {cache.num_kv_heads}, {cache.head_dim}); expected "
                f"({cfg.num_hidden_layers}, {b}, {cfg.num_key_value_heads}, {cfg.head_dim})")
        if cache.dtype != self.embed_tokens.weight.dtype:
            raise TypeError(f"cache has dtype {cache.dtype}; expected the model dtype "
                            f"{self.embed_tokens.weight.dtype}")
        if precision is None:
            precision = cache.precisions[0]
        if precision not in cache.precisions:
            raise ValueError(f"precision {precision} does not fit a {cache.format} cache "
                             f"(expected one of {cache.precisions})")
        counts = [s] * b
        if attention_mask is not None and not bool(attention_mask.all()):
            counts = attention_mask.sum(1).tolist()
            right = torch.arange(s, device=attention_mask.device).view(1, s) < \
                attention_mask.sum(1, keepdim=True)
            if not torch.equal(attention_mask.to(torch.bool), right):
                raise ValueError("attention_mask with a cache must be right padding (each "
                                 "row: ones, then zeros)")
            if any(cache.seq_lengths()):
                raise ValueError("a padding mask is only allowed on the first (prefill) step "
                                 "of a cache; later steps add S tokens to every sequence")
        if position_ids is None:
            start = torch.tensor(cache.seq_lengths(), device=input_ids.device).view(b, 1)
            position_ids = start + torch.arange(s, device=input_ids.device).view(1, s)
        cache.begin_step(counts)
        return attention_mask, position_ids, precision


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 / Qwen3-MoE causal LM with HF parameter names; see the module docstring."""

    def __init__(self, config: Qwen3Config, *, init_weights: bool = True):
        super().__init__()
        if not isinstance(config, Qwen3Config):
            raise TypeError(f"config must be a Qwen3Config, got {type(config).__name__}")
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if init_weights and not self.lm_head.weight.is_meta:
            self.init_weights()
        self.tie_weights()

    # ------------------------------------------------------------------ weights
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's init: normal(0, initializer_range) for linears, embeddings and experts."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Qwen3MoeExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, ops.RMSNorm):
                module.weight.fill_(1.0)
        pad = self.config.pad_token_id
        if pad is not None and 0 <= pad < self.config.vocab_size:
            self.model.embed_tokens.weight[pad].zero_()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ------------------------------------------------------------------ caches
    def new_cache(self, batch_size: int, max_length: int, kind: str = "dense",
                  group_size: int = 128, max_speculative_tokens: int = 16):
        """A preallocated KV cache for this model: kind "dense" or "hierarchical"
        (max_speculative_tokens: how far a hierarchical cache can roll back, >= gamma)."""
        from qwen3_fast.cache import DenseKVCache, HierarchicalKVCache

        cfg = self.config
        args = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim,
                max_length, self.dtype, self.device)
        if kind == "dense":
            return DenseKVCache(*args)
        if kind == "hierarchical":
            return HierarchicalKVCache(*args, group_size=group_size,
                                       max_speculative_tokens=max_speculative_tokens)
        raise ValueError(f"kind must be 'dense' or 'hierarchical', got {kind!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                output_router_logits: Optional[bool] = None,
                logits_to_keep: int = 0, cache=None,
                precision: Optional[int] = None, return_logits: bool = True,
                loss_reduction: str = "mean",
                document_ids: Optional[Tensor] = None) -> CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, S] keep-mask (1 = token, 0 = padding);
        position_ids [B, S] or [1, S] (default 0..S-1, as HF); labels [B, S] with -100 ignored
        (shifted inside, mean over kept tokens); logits_to_keep: 0 = all, n = last n.
        cache: a DenseKVCache / HierarchicalKVCache (see the module docstring); precision:
        16 (dense), 8 or 4 (hierarchical; default 8).
        return_logits=False: no logits; the loss then comes from ops.linear_cross_entropy
        (fused LM head + CE, no [T, V] tensor). loss_reduction: "mean" (HF) or "sum" (the CE
        sum over kept labels, without the MoE aux term, for callers that normalize over a
        global batch; always fused). document_ids [B, S]: packed documents (attention stays
        within a document; pass position_ids restarting at 0 per document)."""
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor [B, S], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        b, s = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                             f"expected input_ids' shape {(b, s)}")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != s
                                         or position_ids.shape[0] not in (1, b)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected "
                             f"[{b}, {s}] or [1, {s}]")
        if labels is not None and tuple(labels.shape) != (b, s):
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {(b, s)}")
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits

        hidden, router_logits = self.model(input_ids, attention_mask, position_ids, cache,
                                           precision, document_ids)
        kept = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
        logits = project(self.lm_head, kept) if return_logits else None  # [B, S, V]

        loss = None
        if labels is not None and logits is not None and loss_reduction == "mean":
            loss = causal_lm_loss(logits, labels)
        elif labels is not None:  # fused LM head + CE: [B, S, V] logits never exist
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            loss = ops.linear_cross_entropy(hidden, self.lm_head.weight, shift_labels,
                                            ignore_index=IGNORE_INDEX, reduction=loss_reduction)
        aux_loss = None
        if output_router_logits and self.config.is_moe and router_logits:
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts,
                                           self.config.num_experts_per_tok, attention_mask)
            if loss is not None and loss_reduction == "mean":
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                              router_logits=tuple(router_logits) if output_router_logits
                              and self.config.is_moe else None,
                              hidden_states=hidden)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                        device=None) -> "Qwen3ForCausalLM":
        """Load a HF checkpoint directory (config.json + safetensors); see model/checkpoint.py."""
        from qwen3_fast.model.checkpoint import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device, model_class=cls)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and HF-format safetensors (per-expert keys, index when sharded)."""
        from qwen3_fast.model.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 max_new_tokens: int = 20, **kwargs) -> Tensor:
        """transformers-style ``generate``: [B, S] (left-padded) ids -> [B, S + n] ids.

        Arguments and padding as transformers (do_sample, temperature, top_p, top_k, min_p,
        repetition_penalty, eos_token_id, pad_token_id; plus seed, kv_cache); see
        qwen3_fast/generate/hf_generate.py."""
        # Imported here: the engine layer sits above model/ (DESIGN.md "Layers"), so model/
        # must not import it at module level; this method only forwards to it.
        from qwen3_fast.generate.hf_generate import hf_generate

        return hf_generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """HF ForCausalLMLoss: fp32 CE of logits[t] against labels[t+1], mean over labels != -100."""
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), shift_labels.view(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")


Qwen3MoeForCausalLM = Qwen3ForCausalLM

__all__ = ["CausalLMOutput", "Qwen3ForCausalLM", "Qwen3Model", "Qwen3MoeForCausalLM",
           "causal_lm_loss"]
