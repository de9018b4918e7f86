"""Helpers for the model tests: tiny HF configs, HF <-> ours parameter-name mapping, metrics."""
from __future__ import annotations

import re

import torch

transformers = __import__("pytest").importorskip("transformers")
TF5 = int(transformers.__version__.split(".")[0]) >= 5

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=128)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def hf_model(moe: bool = False, rope_theta: float = 1e6, rope_scaling=None, seed: int = 0,
             **overrides):
    """A random HF Qwen3 / Qwen3-MoE model (whichever transformers is installed), eval mode."""
    kw = {**BASE, **(MOE if moe else {}), **overrides}
    if TF5:
        params = {"rope_type": "default", "rope_theta": rope_theta}
        if rope_scaling:
            params.update(rope_scaling)
        kw["rope_parameters"] = params
    else:
        kw.update(rope_theta=rope_theta, rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    if moe:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    with torch.no_grad():  # norms start at 1; randomize them so their math is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def left_padded_batch(vocab: int = 256, b: int = 3, s: int = 12, seed: int = 1):
    """input_ids [B, S], attention_mask [B, S] with left padding on rows 1.., labels -100 at pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row in range(1, b):
        mask[row, : 2 * row] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids from a left-padding mask: 0 at the first real token (pads clamped to 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over all elements, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def per_expert(named: dict, inter: int) -> dict:
    """Expand stacked expert tensors ([E, 2I, H] / [E, H, I]) to HF per-expert keys."""
    out = {}
    for key, t in named.items():
        m = _EXPERT.match(key)
        if not m:
            out[key] = t
            continue
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
            else:
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{m.group(1)}.{e}.up_proj.weight"] = t[e, inter:]
    return out


def grads(model, inter: int = MOE["moe_intermediate_size"]) -> dict:
    """{HF per-expert key: grad} for every parameter (tied weights once)."""
    return per_expert({k: p.grad for k, p in model.named_parameters()}, inter)
