"""The reference-backed ops the model adds: rope_cache / qk_norm_rope, attention, MoE routing,
experts and load-balancing loss, against transformers' own functions and plain math."""
from __future__ import annotations

import pytest
import torch

from model_testlib import TF5, transformers
from qwen3_fast.ops import reference
from qwen3_fast.ops.attention import attention
from qwen3_fast.ops.moe import load_balancing_loss, moe_experts, moe_route
from qwen3_fast.ops.rope import qk_norm_rope, rope_cache

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _hf_rotary(scaling, theta=1e6, head_dim=32, max_pos=256):
    kw = dict(hidden_size=128, num_attention_heads=4, head_dim=head_dim,
              max_position_embeddings=max_pos)
    if TF5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:
        kw.update(rope_theta=theta, rope_scaling=scaling)
    cfg = transformers.Qwen3Config(**kw)
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return cfg, Qwen3RotaryEmbedding(cfg)


@pytest.mark.parametrize("scaling", [None, YARN, dict(YARN, attention_factor=1.5)],
                         ids=["default", "yarn", "yarn-explicit-factor"])
def test_rope_cache_equals_transformers(scaling):
    cfg, rotary = _hf_rotary(scaling)
    positions = torch.arange(256)[None]
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cache(cfg, 256)
    assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])
    if scaling and "attention_factor" not in scaling:  # 0.1 ln 4 + 1 on cos and sin
        assert abs(cos[0, 0].item() - 1.1386) < 1e-4


def test_rope_cache_from_dict_and_errors():
    params = {"head_dim": 16, "rope_theta": 1e4}
    cos, sin = rope_cache(params, 10, dtype=torch.bfloat16)
    assert cos.shape == (10, 16) and cos.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_positions"):
        rope_cache(params, 0)
    with pytest.raises(ValueError, match="rope type 'linear'"):
        rope_cache({**params, "rope_scaling": {"rope_type": "linear", "factor": 2}}, 8)
    with pytest.raises(ValueError, match="head_dim"):
        rope_cache({"rope_theta": 1e4}, 8)


def test_qk_norm_rope_matches_hf_math_and_shapes():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    torch.manual_seed(0)
    b, s, hq, hkv, d = 2, 5, 4, 2, 16
    q, k = torch.randn(b, s, hq, d), torch.randn(b, s, hkv, d)
    qw, kw = torch.rand(d) + 0.5, torch.rand(d) + 0.5
    cos, sin = rope_cache({"head_dim": d, "rope_theta": 1e6}, 32)
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    q_out, k_out = qk_norm_rope(q, k, qw, kw, cos, sin, pos, 1e-6)
    qn, kn = reference.rms_norm(q, qw, 1e-6), reference.rms_norm(k, kw, 1e-6)
    q_ref, k_ref = apply_rotary_pos_emb(qn.transpose(1, 2), kn.transpose(1, 2), cos[pos], sin[pos])
    # the norm runs in the rms_norm op (C++ kernel on CPU): equal up to fp32 rounding
    torch.testing.assert_close(q_out, q_ref.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref.transpose(1, 2), rtol=1e-6, atol=1e-6)
    q_flat, k_flat = qk_norm_rope(q.flatten(0, 1), k.flatten(0, 1), qw, kw, cos, sin,
                                  pos.flatten(), 1e-6)
    assert torch.equal(q_flat, q_out.flatten(0, 1)) and torch.equal(k_flat, k_out.flatten(0, 1))


def test_qk_norm_rope_checks_and_gradcheck():
    d = 8
    cos, sin = rope_cache({"head_dim": d, "rope_theta": 1e4}, 16, dtype=torch.float64)
    q = torch.randn(3, 2, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 1, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(d, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 5, 2])
    assert torch.autograd.gradcheck(
        lambda q, k, w: qk_norm_rope(q, k, w, w, cos, sin, pos, 1e-6), (q, k, w))
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(q, k, w, w, cos, sin, pos[:2], 1e-6)
    with pytest.raises(ValueError, match="k has head_dim"):
        qk_norm_rope(q, k[..., :4], w, w, cos, sin, pos, 1e-6)
    with pytest.raises(TypeError, match="positions"):
        qk_norm_rope(q, k, w, w, cos, sin, pos.float(), 1e-6)
    with pytest.raises(ValueError, match="q_weight"):
        qk_norm_rope(q, k, w[:4], w, cos, sin, pos, 1e-6)


def _naive_attention(q, k, v, keep, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s_q, s_kv = q.shape[2], k.shape[2]
    allowed = torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q) & keep[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), -1).nan_to_num(0.0)
    return probs.to(q.dtype) @ v


@pytest.mark.parametrize("s_q", [6, 2], ids=["prefill", "chunk"])
def test_attention_gqa_padding(s_q):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, s_q, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    out = attention(q, k, v, attention_mask=keep)
    torch.testing.assert_close(out, _naive_attention(q, k, v, keep.bool(), 8 ** -0.5))
    torch.testing.assert_close(attention(q, k, v, scale=0.3),
                               _naive_attention(q, k, v, torch.ones(2, 6, dtype=torch.bool), 0.3))
    assert torch.isfinite(out).all()


def test_attention_checks():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="divisible"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        attention(k, k, k, attention_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        attention(k, k, k, attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="v has dtype"):
        attention(k, k, k.double())


def test_moe_route_and_experts_match_hf_block():
    if TF5:
        pytest.skip("HF 4.x sparse block API (experts as a module list)")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=2,
                                      moe_intermediate_size=8)
    for norm in (True, False):
        cfg.norm_topk_prob = norm
        block = Qwen3MoeSparseMoeBlock(cfg)
        x = torch.randn(1, 10, 16)
        ref, logits = block(x)
        w_gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                                 for e in block.experts])
        w_down = torch.stack([e.down_proj.weight for e in block.experts])
        out = moe_experts(x[0], logits, w_gate_up, w_down, 2, norm)
        torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
    weights, ids, probs = moe_route(logits, 2, True)
    assert weights.dtype == torch.float32 and ids.shape == (10, 2) and probs.shape == (10, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))


def test_moe_checks_and_gradcheck():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(5, 3, dtype=torch.float64)
    wgu = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: moe_experts(x, logits, a, b, 2, True),
                                    (x, wgu, wd))
    with pytest.raises(ValueError, match="top_k"):
        moe_experts(x, logits, wgu, wd, 4, True)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, logits, wgu, wd[:, :, :2], 2, True)
    with pytest.raises(ValueError, match="router_logits"):
        moe_experts(x, logits[:4], wgu, wd, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, 0, True)


def test_load_balancing_loss_equals_hf():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(0)
    layers = tuple(torch.randn(2 * 5, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for m in (None, mask):
        ref = load_balancing_loss_func(layers, 8, 2, m)
        torch.testing.assert_close(load_balancing_loss(layers, 8, 2, m), ref)
    uniform = load_balancing_loss((torch.zeros(4, 8),), 8, 2)
    torch.testing.assert_close(uniform, torch.tensor(2.0))  # = top_k for uniform routing
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(layers, 6, 2)
    with pytest.raises(ValueError, match="non-empty"):
        load_balancing_loss((), 8, 2)
