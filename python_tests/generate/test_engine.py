"""qwen3_fast.LLM end to end on a tiny random checkpoint with a small test tokenizer.

Batched ragged prompts decode as each prompt alone; per-sequence stopping; stop strings
across token boundaries; streaming yields exactly the non-streamed text; the thinking budget
inserts Qwen3's sentence and ends the thinking; seeded sampling reproduces; the int8
(hierarchical) cache runs; defaults come from generation_config.json or the mode.
"""
from __future__ import annotations

import pytest
import torch

from gen_testlib import one_thread, tiny_model_dir  # noqa: F401 (autouse fixture)
from qwen3_fast import LLM, SamplingParams
from qwen3_fast.generate.params import BUDGET_SENTENCE

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_seq_len=160, max_batch_size=4)


PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog.", "Numbers: 0 1 2"]


def test_batched_ragged_greedy_equals_single_and_hf_path(llm):
    sp = SamplingParams(max_new_tokens=12, **GREEDY)
    batch = llm.generate(PROMPTS, sp)
    for out, prompt in zip(batch, PROMPTS):
        alone = llm.generate(prompt, sp)[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        hf_path = llm.model.generate(ids, max_new_tokens=12, eos_token_id=[])
        assert out.token_ids == hf_path[0, ids.shape[1]:].tolist()
        assert out.finish_reason == "length" and out.completion_tokens == 12
        assert out.prompt_tokens == ids.shape[1] and out.prefill_seconds > 0
    # the batch runs in chunks of max_batch_size with the same results, caches reused
    caches = dict(llm._caches)
    again = llm.generate(PROMPTS * 2, sp)
    assert [o.token_ids for o in again] == [o.token_ids for o in batch] * 2
    assert all(llm._caches[k] is v for k, v in caches.items())


def test_per_sequence_stop_token(llm):
    free = llm.generate(PROMPTS, SamplingParams(max_new_tokens=10, **GREEDY))
    stop_id = free[1].token_ids[3]
    k = free[1].token_ids.index(stop_id)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id],
                                                **GREEDY))
    assert outs[1].token_ids == free[1].token_ids[:k + 1]
    assert outs[1].finish_reason == "stop" and outs[1].stop_reason == stop_id
    assert outs[1].text == llm.tokenizer.decode(free[1].token_ids[:k], skip_special_tokens=True)
    for i in (0, 2):  # the other rows are not affected by row 1 stopping
        if stop_id not in free[i].token_ids:
            assert outs[i].token_ids == free[i].token_ids


def test_stop_string_across_tokens_and_streaming(llm):
    sp = SamplingParams(max_new_tokens=24, **GREEDY)
    free = llm.generate(PROMPTS[1], sp)[0]
    pieces = [llm.tokenizer.decode([t], skip_special_tokens=True) for t in free.token_ids]
    # a stop string from the last character of one token to the first of a later one
    i = next(j for j in range(3, len(pieces) - 1) if pieces[j] and pieces[j + 1]
             and "\ufffd" not in pieces[j] + pieces[j + 1])
    before = "".join(pieces[:i])
    stop = pieces[i][-1] + pieces[i + 1][:1]
    cut = (before + pieces[i] + pieces[i + 1]).find(stop)
    sp_stop = SamplingParams(max_new_tokens=24, stop=[stop], **GREEDY)
    out = llm.generate(PROMPTS[1], sp_stop)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:cut]
    events = list(llm.generate(PROMPTS[1], sp_stop, stream=True))
    assert "".join(e.text for e in events) == out.text
    assert events[-1].output.text == out.text


def test_streaming_chat_equals_non_streamed(llm):
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "What is 1 + 2?"}]]
    sp = [SamplingParams(temperature=0.8, top_k=0, top_p=0.95, seed=s, max_new_tokens=20)
          for s in (1, 2)]
    outs = llm.chat(convs, sampling=sp)
    events = list(llm.chat(convs, sampling=sp, stream=True))
    for i, out in enumerate(outs):
        mine = [e for e in events if e.index == i]
        assert "".join(e.text for e in mine) == out.text
        assert [t for e in mine for t in e.token_ids] == out.token_ids
        assert mine[-1].output.token_ids == out.token_ids
    again = llm.chat(convs, sampling=sp)  # seeded: reproducible
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    other = llm.chat(convs, sampling=[SamplingParams(temperature=0.8, top_k=0, seed=9,
                                                     max_new_tokens=20)] * 2)
    assert [o.token_ids for o in other] != [o.token_ids for o in outs]


def test_thinking_budget_inserts_sentence_and_ends_thinking(llm):
    sentence = llm.tokenizer.encode(BUDGET_SENTENCE)
    budget = 6
    conv = [{"role": "user", "content": "Think about it."}]
    out = llm.chat(conv, thinking_budget=budget,
                   sampling=SamplingParams(max_new_tokens=budget + len(sentence) + 5, **GREEDY))
    free = llm.chat(conv, sampling=SamplingParams(max_new_tokens=budget, **GREEDY))
    assert llm.tokenizer.think_end_id not in free.token_ids  # it had not stopped thinking
    assert out.token_ids[:budget] == free.token_ids
    assert out.token_ids[budget:budget + len(sentence)] == sentence
    assert out.thinking_budget_hit and len(out.token_ids) == budget + len(sentence) + 5
    assert out.reasoning_content is not None
    assert out.reasoning_content.endswith(BUDGET_SENTENCE.split("\n</think>")[0])
    assert out.text.startswith(free.text)
    answer = out.text.split("</think>", 1)[1].lstrip("\n")
    assert out.content == answer and out.finish_reason == "length"
    # non-thinking mode: the prompt carries the empty think block, no budget applies
    plain = llm.chat(conv, enable_thinking=False, thinking_budget=budget,
                     sampling=SamplingParams(max_new_tokens=10, **GREEDY))
    assert not plain.thinking_budget_hit


def test_int8_cache_end_to_end(model_dir, llm):
    q = LLM(model_dir, kv_cache="int8", max_seq_len=160, group_size=8)
    sp = SamplingParams(max_new_tokens=40, **GREEDY)
    got = q.generate(PROMPTS[1], sp)[0]
    want = llm.generate(PROMPTS[1], sp)[0]
    # 40 tokens past a 12-token prompt with G = 8: most keys are read back quantized
    assert len(got.token_ids) == 40 and q._caches[1].quantized_lengths()[0] >= 32
    assert got.token_ids[0] == want.token_ids[0]  # prefill attends the exact keys
    # the engine's tokens are the greedy tokens of the model over an 8-bit cache
    ids = torch.tensor([q.tokenizer.encode(PROMPTS[1])])
    cache = q.model.new_cache(1, 160, "hierarchical", group_size=8)
    with torch.no_grad():
        logits = q.model(ids, cache=cache).logits[:, -1]
        manual = []
        for _ in range(40):
            manual.append(int(logits.argmax(-1)))
            logits = q.model(torch.tensor([[manual[-1]]]), cache=cache).logits[:, -1]
    assert got.token_ids == manual


def test_defaults_from_generation_config_or_mode(tmp_path, llm):
    p = llm._resolve(None, 2, [True, False])
    assert (p[0].temperature, p[0].top_p, p[0].top_k, p[0].presence_penalty) == (0.6, 0.95, 20, 0.0)
    assert (p[1].temperature, p[1].top_p, p[1].top_k, p[1].presence_penalty) == (0.7, 0.8, 20, 1.5)
    assert llm._resolve(SamplingParams(temperature=0.3), 1, [True])[0].temperature == 0.3
    d = tiny_model_dir(tmp_path, generation_config={"do_sample": False, "top_p": 0.5,
                                                    "eos_token_id": [3, 4]})
    g = LLM(d, max_seq_len=64)
    p = g._resolve(None, 1, [False])[0]
    assert p.temperature == 0.0 and p.top_p == 0.5 and p.presence_penalty == 1.5
    assert {3, 4} <= set(g.eos_token_ids)


def test_moe_checkpoint_and_errors(tmp_path, llm):
    d = tiny_model_dir(tmp_path / "moe", moe=True)
    moe = LLM(d, max_seq_len=64)
    outs = moe.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, **GREEDY))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path)
    with pytest.raises(ValueError, match="max_seq_len"):
        llm.generate([list(range(10)) * 20])
    with pytest.raises(ValueError, match="kv_cache"):
        LLM(d, kv_cache="fp4")
    with pytest.raises(ValueError, match="thinking_budget"):
        llm.chat([{"role": "user", "content": "x"}], thinking_budget=-1)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])


@pytest.mark.parametrize("sync_every", [1, 8])  # 8: CUDA's windowed host sync
def test_finished_long_prompt_does_not_outgrow_the_cache(model_dir, sync_every):
    small = LLM(model_dir, max_seq_len=40)
    small.sync_every = sync_every
    long_prompt = list(range(100, 130))  # 30 tokens: room for 10 new ones
    outs = small.generate([long_prompt, [5, 6, 7]], SamplingParams(**GREEDY))
    assert [len(o.token_ids) for o in outs] == [10, 37]
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert outs[0].token_ids == small.generate(long_prompt, SamplingParams(**GREEDY))[0].token_ids


def test_windowed_host_sync_gives_the_same_results(llm):
    """CUDA copies tokens to the host every few steps; the results must not change."""
    stop_id = llm.generate(PROMPTS[1], SamplingParams(max_new_tokens=10, **GREEDY))[0].token_ids[4]
    sp = SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id], **GREEDY)
    want = llm.generate(PROMPTS, sp)
    try:
        llm.sync_every = 3
        got = llm.generate(PROMPTS, sp)
    finally:
        llm.sync_every = 1
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
        [(o.token_ids, o.text, o.finish_reason) for o in want]


def test_from_model_uses_live_weights_and_leaves_them_alone(model_dir, llm):
    """LLM.from_model (training rollouts) generates like LLM(dir), reads the CURRENT weights
    (a changed model changes the output) and never touches the parameters or their grads."""
    from qwen3_fast.model import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(model_dir)
    model.train()
    live = LLM.from_model(model, llm.tokenizer, max_seq_len=160, max_batch_size=4)
    sp = SamplingParams(max_new_tokens=10, **GREEDY)
    assert [o.token_ids for o in live.generate(PROMPTS, sp)] == \
        [o.token_ids for o in llm.generate(PROMPTS, sp)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    flipped = live.generate(PROMPTS[0], sp)[0].token_ids
    assert flipped != llm.generate(PROMPTS[0], sp)[0].token_ids
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.lm_head.weight, -before["lm_head.weight"])
    with pytest.raises(TypeError, match="model must be a Qwen3ForCausalLM"):
        LLM.from_model(object(), llm.tokenizer)
    with pytest.raises(ValueError, match="max_seq_len"):
        LLM.from_model(model, llm.tokenizer, max_seq_len=0)
