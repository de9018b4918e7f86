"""Parity of qwen3_fast's Qwen3ForCausalLM with transformers on tiny random checkpoints.

Each case: a random HF model saved with ``save_pretrained`` and loaded by ours, a left-padded
batch, logits compared on real tokens (max relative error < 1e-5 in fp32), loss, aux loss and
every parameter gradient compared; with HF's default positions and with mask-derived
``position_ids``. Runs against whichever transformers (4.57 or 5.x) is installed.
"""
from __future__ import annotations

import pytest
import torch

from model_testlib import (MOE, TF5, grads, hf_model, left_padded_batch, mask_positions,
                           max_rel_err)
from qwen3_fast.model import Qwen3ForCausalLM

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "dense-gqa-tied-yarn": dict(moe=False, rope_scaling=YARN, tie_word_embeddings=True),
    "dense-mha-untied": dict(moe=False, num_key_value_heads=4, tie_word_embeddings=False,
                             rope_theta=10000.0),
    "moe-norm-topk-mlp-only": dict(moe=True, norm_topk_prob=True, mlp_only_layers=[1],
                                   num_hidden_layers=3),
    "moe-no-norm-sparse-step-2": dict(moe=True, norm_topk_prob=False, decoder_sparse_step=2,
                                      num_hidden_layers=4, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (hf_model, checkpoint dir)}, each saved once by transformers."""
    out = {}
    for name, kw in CASES.items():
        hf = hf_model(**kw)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        out[name] = (hf, path)
    return out


def _run(model, ids, mask, labels, positions, moe):
    kw = dict(attention_mask=mask, labels=labels, position_ids=positions)
    if moe:
        kw["output_router_logits"] = True
    return model(ids, **kw)


@pytest.mark.parametrize("explicit_positions", [False, True], ids=["hf-positions", "mask-positions"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_logits_loss_aux_and_grads(checkpoints, case, explicit_positions):
    hf, path = checkpoints[case]
    moe = CASES[case]["moe"]
    ours = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, mask, labels = left_padded_batch()
    positions = mask_positions(mask) if explicit_positions else None

    hf.zero_grad(set_to_none=True)
    ref = _run(hf, ids, mask, labels, positions, moe)
    out = _run(ours, ids, mask, labels, positions, moe)
    keep = mask.bool()
    assert max_rel_err(out.logits[keep], ref.logits[keep]) < 1e-5
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    if moe:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
        assert len(out.router_logits) == sum(layer.is_sparse for layer in ours.model.layers)
    else:
        assert out.aux_loss is None

    ref.loss.backward()
    out.loss.backward()
    g_ref, g_out = grads(hf), grads(ours)
    assert g_ref.keys() == g_out.keys()
    for key in g_ref:
        a, b = g_out[key], g_ref[key]
        if b is None:  # HF leaves never-routed experts without a grad
            assert a is None or a.abs().max() == 0, key
            continue
        scale = b.abs().max().clamp(min=1e-6)
        assert (a - b).abs().max() / scale < 1e-4, key


@pytest.mark.parametrize("case", ["dense-gqa-tied-yarn", "moe-norm-topk-mlp-only"])
def test_bf16_logits_close(checkpoints, case):
    hf, path = checkpoints[case]
    hf_bf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16) if TF5 else \
        type(hf).from_pretrained(path, torch_dtype=torch.bfloat16)
    ours = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        ref = hf_bf16(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out[keep], ref[keep]) < 2e-2


def test_unpadded_batch_and_logits_to_keep(checkpoints):
    hf, path = checkpoints["moe-norm-topk-mlp-only"]
    ours = Qwen3ForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        full = ours(ids).logits
        last = ours(ids, logits_to_keep=1).logits
    assert max_rel_err(full, ref) < 1e-5
    torch.testing.assert_close(last, full[:, -1:])


def test_aux_loss_only_when_requested(checkpoints):
    _, path = checkpoints["moe-no-norm-sparse-step-2"]
    ours = Qwen3ForCausalLM.from_pretrained(path)
    ids, mask, labels = left_padded_batch()
    plain = ours(ids, attention_mask=mask, labels=labels)
    assert plain.aux_loss is None and plain.router_logits is None
    with_aux = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    coef = ours.config.router_aux_loss_coef
    torch.testing.assert_close(with_aux.loss, plain.loss + coef * with_aux.aux_loss)
    assert with_aux.router_logits[0].shape == (ids.numel(), MOE["num_experts"])


def test_forward_rejects_bad_inputs(checkpoints):
    _, path = checkpoints["dense-mha-untied"]
    ours = Qwen3ForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        ours(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ours(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="position_ids"):
        ours(ids, position_ids=torch.arange(4)[None])
