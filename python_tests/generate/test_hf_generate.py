"""``Qwen3ForCausalLM.generate`` against transformers' ``generate`` on the same weights.

Greedy output must be token for token transformers' on tiny random dense and MoE checkpoints
with a left-padded batch of prompts of different lengths (and with an eos that fires, so the
padding of finished rows is checked too); seeded sampling is reproducible.

    pytest python_tests/generate/test_hf_generate.py
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
from gen_testlib import one_thread  # noqa: E402,F401 (autouse fixture)
from model_testlib import hf_model  # noqa: E402

from qwen3_fast.model import Qwen3ForCausalLM  # noqa: E402


def _pair(tmp_path, moe: bool):
    # initializer_range 0.2: peaky logits, so greedy choices are not decided by rounding
    hf = hf_model(moe=moe, initializer_range=0.2)
    hf.save_pretrained(tmp_path)
    return hf, Qwen3ForCausalLM.from_pretrained(tmp_path)


def _left_padded(lens, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = max(lens)
    ids = torch.zeros(len(lens), s, dtype=torch.long)
    mask = torch.zeros(len(lens), s, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, s - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, s - n:] = 1
    return ids, mask


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_equals_transformers(tmp_path, moe):
    hf, ours = _pair(tmp_path, moe)
    ids, mask = _left_padded([9, 4, 13])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                        eos_token_id=[], pad_token_id=0)
    assert got.shape == want.shape == (3, 13 + 16)
    assert torch.equal(got, want)
    # an eos that some rows produce early: finished rows are padded, as in transformers
    eos = int(want[1, 13 + 2])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                       eos_token_id=eos, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos,
                        pad_token_id=0)
    assert torch.equal(got, want)


def test_greedy_repetition_penalty_equals_transformers(tmp_path):
    hf, ours = _pair(tmp_path, False)
    ids, mask = _left_padded([6, 11], seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
              repetition_penalty=1.3)
    assert torch.equal(ours.generate(ids, eos_token_id=[], **kw),
                       hf.generate(ids, eos_token_id=None, **kw))


def test_seeded_sampling_is_reproducible(tmp_path):
    _, ours = _pair(tmp_path, False)
    ids, mask = _left_padded([5, 8], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5,
              top_k=0, top_p=0.95, eos_token_id=[])
    a = ours.generate(ids, seed=7, **kw)
    b = ours.generate(ids, seed=7, **kw)
    c = ours.generate(ids, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids, max_new_tokens=0)
