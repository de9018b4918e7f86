"""LLM(speculative=QuantSpecConfig(...)): self-speculative decoding through the engine.

Greedy speculative output equals greedy plain decoding over the same int8 cache token for
token (dense and MoE, a ragged batch, many group boundaries with G = 8), also with the
thinking budget and stop strings; results carry the acceptance statistics.
"""
from __future__ import annotations

import pytest

from gen_testlib import one_thread, tiny_model_dir  # noqa: F401 (autouse fixture)
from qwen3_fast import LLM, QuantSpecConfig, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog.", "Numbers: 0 1 2",
           "A"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_moe"), moe=True)


def _pair(path, **spec):
    plain = LLM(path, kv_cache="int8", max_seq_len=160, group_size=8)
    fast = LLM(path, kv_cache="int8", max_seq_len=160,
               speculative=QuantSpecConfig(group_size=8, **spec))
    return plain, fast


@pytest.mark.parametrize("which,spec", [
    ("dense", dict(gamma=3)),
    ("dense", dict(gamma="auto", max_gamma=6)),
    ("dense", dict(gamma=4, draft_weight_bits=4)),
    ("moe", dict(gamma=3)),
])
def test_greedy_speculative_equals_plain(which, spec, dense_dir, moe_dir):
    plain, fast = _pair(dense_dir if which == "dense" else moe_dir, **spec)
    sp = SamplingParams(max_new_tokens=48, **GREEDY)
    want = plain.generate(PROMPTS, sp)
    got = fast.generate(PROMPTS, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    for o in got:
        s = o.speculative
        assert s is not None and s["steps"] > 0 and s["drafted"] > 0
        assert 0 <= s["accepted"] <= s["drafted"]
        assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
        assert 1 <= s["gamma_mean"] <= spec.get("max_gamma", 8)
        assert s["speedup_estimate"] is not None and s["plain_step_seconds"] > 0
    assert plain.generate(PROMPTS[0], sp)[0].speculative is None


def test_speculative_with_budget_stop_strings_and_streaming(dense_dir):
    plain, fast = _pair(dense_dir, gamma=4)
    conv = [{"role": "user", "content": "Think about it."}]
    sp = SamplingParams(max_new_tokens=40, **GREEDY)
    want = plain.chat(conv, thinking_budget=5, sampling=sp)
    got = fast.chat(conv, thinking_budget=5, sampling=sp)
    assert got.token_ids == want.token_ids and got.thinking_budget_hit
    # a stop string taken from the plain output ends both at the same place
    text = plain.generate(PROMPTS[1], sp)[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        sp_stop = SamplingParams(max_new_tokens=40, stop=[stop], **GREEDY)
        a = plain.generate(PROMPTS[1], sp_stop)[0]
        b = fast.generate(PROMPTS[1], sp_stop)[0]
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    streamed = "".join(e.text for e in fast.generate(PROMPTS[:2], sp, stream=True) if e.index == 1)
    assert streamed == fast.generate(PROMPTS[:2], sp)[1].text


def test_speculative_sampling_seeded_reproducible(dense_dir):
    _, fast = _pair(dense_dir, gamma=3)
    sp = [SamplingParams(temperature=0.8, top_k=20, max_new_tokens=30, seed=s, ignore_eos=True)
          for s in (1, 2)]
    a = fast.generate(PROMPTS[:2], sp)
    b = fast.generate(PROMPTS[:2], sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 30 for o in a)


def test_speculative_bad_configs(dense_dir):
    with pytest.raises(ValueError, match="int8"):
        LLM(dense_dir, kv_cache="bf16", speculative=QuantSpecConfig())
    with pytest.raises(TypeError, match="QuantSpecConfig"):
        LLM(dense_dir, kv_cache="int8", speculative={"gamma": 4})
