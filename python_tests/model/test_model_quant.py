"""int4 draft weights (model/quant.py): quantization bounds, kernel vs oracle, draft switch."""
from __future__ import annotations

import copy

import pytest
import torch

from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM
from qwen3_fast.model.quant import (Int4Linear, attach_draft_weights, dequantize_int4,
                                    draft_weights, quantize_int4)


def _tiny(moe: bool = False, dtype=torch.float32):
    extra = (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64) if moe else {})
    cfg = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=256, initializer_range=0.05, **extra)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_int4_error_bound(group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    w[3, :group_size] = 7.0  # a constant group is exact
    w[5, 10] = 50.0          # an outlier only widens its own group
    q, s, lo = quantize_int4(w, group_size)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, s, lo) - w).abs().reshape(48, -1, group_size)
    assert torch.all(err <= s.unsqueeze(-1) / 2 + 1e-6)
    assert err[3, 0].max() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_linear_matches_dequantized_matmul(dtype, tol, rows):
    torch.manual_seed(1)
    w = torch.randn(96, 256, dtype=dtype)
    lin = Int4Linear(w, group_size=64)
    x = torch.randn(2, rows, 256, dtype=dtype)
    y = lin(x)
    assert y.shape == (2, rows, 96) and y.dtype == dtype
    q, s, lo = quantize_int4(w, 64)
    ref = x.double() @ dequantize_int4(q, s, lo).double().t()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    # and it is a 4-bit approximation of w, not w itself
    exact = x.double() @ w.double().t()
    assert ((y.double() - exact).norm() / exact.norm()).item() > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.randn(32, 64), group_size=16), "group_size"),
    (dict(weight=torch.randn(32, 96), group_size=64), "in_features"),
    (dict(weight=torch.randn(40, 64), group_size=32), "out_features"),
    (dict(weight=torch.randn(64), group_size=32), "weight"),
])
def test_int4_linear_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Int4Linear(**kwargs)


def test_draft_weights_switch_only_inside_the_block():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        base = model(ids).logits
        nbytes = attach_draft_weights(model, group_size=64)
        assert model(ids).logits.equal(base)  # attached but not active
        with draft_weights(model):
            draft = model(ids).logits
        after = model(ids).logits
    assert after.equal(base)
    # int4 MLP weights: 2 layers x (512 x 128 + 128 x 256) x 0.5 byte + scales/zeros
    assert nbytes > 2 * (512 * 128 + 128 * 256) // 2
    assert not draft.equal(base)
    # the draft equals the model with its MLP weights replaced by their int4 dequantization
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for layer in oracle.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.copy_(dequantize_int4(*quantize_int4(proj.weight, 64)))
        expected = oracle(ids).logits
    torch.testing.assert_close(draft, expected, rtol=1e-4, atol=1e-4)
    assert not any("draft" in k for k in model.state_dict())  # checkpoints stay HF-shaped


def test_draft_weights_reject_moe():
    with pytest.raises(ValueError, match="draft_weight_bits=16"):
        attach_draft_weights(_tiny(moe=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_int4_linear_cuda_matches_dequantized_matmul():
    torch.manual_seed(2)
    w = torch.randn(256, 1024, dtype=torch.bfloat16, device="cuda")
    lin = Int4Linear(w, group_size=128)
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    q, s, lo = quantize_int4(w, 128)
    ref = x.double() @ dequantize_int4(q, s, lo).double().t()
    rel = ((lin(x).double() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
