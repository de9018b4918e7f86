"""GRPO rewards (train/rewards.py): math-verify answers, exact match, format and mode
following, callables, the judge, the reward-model scorer and per-task selection."""
from __future__ import annotations

import sys

import pytest
import torch

from qwen3_fast.train import rewards as R


def _s(answer=None, **kw):
    return {"prompt": "What is half of one?", "answer": answer, **kw}


@pytest.mark.parametrize("reply", ["<think>\nhalf\n</think>\n\n0.5",
                                   "<think>x</think>The answer is $\\frac{1}{2}$.",
                                   "\\boxed{\\frac12}", "2/4", "1/2"])
def test_math_reward_equivalent_forms(reply):
    assert R.math_reward(reply, _s("1/2")) == 1.0
    assert R.math_reward(reply, _s("0.5")) == 1.0


def test_math_reward_wrong_or_missing():
    assert R.math_reward("<think>1/2</think>0.6", _s("1/2")) == 0.0  # only the answer counts
    assert R.math_reward("I do not know", _s("1/2")) == 0.0
    assert R.math_reward("", _s("7")) == 0.0
    assert R.math_reward("<think>..</think>\\boxed{12}", _s("12")) == 1.0
    with pytest.raises(ValueError, match="answer"):
        R.math_reward("1", {"prompt": "p"})


def test_exact_match():
    assert R.exact_match_reward("<think>hm</think>\n\n apple \n", _s("apple")) == 1.0
    assert R.exact_match_reward("apple pie", _s("apple")) == 0.0
    assert R.exact_match_reward("New  York", _s("New York")) == 1.0


def test_format_reward():
    think = _s()
    assert R.format_reward("<think>\nsteps\n</think>\n\n42", think) == 1.0
    assert R.format_reward("<think>\n\n</think>\n\n42", think) == 1.0  # well-formed, empty
    assert R.format_reward("42", think) == 0.0  # no think block
    assert R.format_reward("<think>a</think>", think) == 0.0  # no answer
    assert R.format_reward("<think>a</think>b<think>c</think>d", think) == 0.0
    assert R.format_reward("x <think>a</think> 42", think) == 0.0  # block not at the start
    plain = _s(enable_thinking=False)  # the prompt already ends with the empty block
    assert R.format_reward("42", plain) == 1.0
    assert R.format_reward("<think>a</think>42", plain) == 0.0


def test_thinking_requested():
    assert R.thinking_requested({"prompt": "hi"}) is True
    assert R.thinking_requested({"prompt": "hi", "enable_thinking": False}) is False
    assert R.thinking_requested({"prompt": "hi /no_think"}) is False
    assert R.thinking_requested({"prompt": "hi /no_think", "enable_thinking": True}) is False
    assert R.thinking_requested({"prompt": "/no_think hi /think"}) is True  # last flag wins
    multi = {"messages": [{"role": "user", "content": "a /no_think"},
                          {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c /think"}]}
    assert R.thinking_requested(multi) is True  # the last user turn's flag


def test_mode_reward():
    think, no_think = _s(prompt="q /think"), {"prompt": "q /no_think"}
    assert R.mode_reward("<think>\nreason\n</think>\n\nA", think) == 1.0
    assert R.mode_reward("<think>\n\n</think>\n\nA", think) == 0.0
    assert R.mode_reward("<think>\n\n</think>\n\nA", no_think) == 1.0
    assert R.mode_reward("<think>\nreason\n</think>\n\nA", no_think) == 0.0
    assert R.mode_reward("A", no_think) == 0.0  # the empty block is required
    assert R.mode_reward("<think>\n\n</think>\n\n", no_think) == 0.0  # and an answer
    hard_off = {"prompt": "q", "enable_thinking": False}
    assert R.mode_reward("A", hard_off) == 1.0  # the prompt carried the empty block
    assert R.mode_reward("<think>x</think>A", hard_off) == 0.0


def test_callable_judge_and_reward_set(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(text, sample):\n    return float(len(text))\n"
        "def judge(question, reply, reference):\n"
        "    return 1.0 if reference in reply and 'Name' in question else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    specs = [R.RewardSpec(name="callable", function="my_rewards:length", weight=0.5,
                          tasks=["count"]),
             R.RewardSpec(name="judge", function="my_rewards:judge", tasks=["qa"]),
             R.RewardSpec(name="exact_match", tasks=["qa"], label="em"),
             R.RewardSpec(name="format", weight=0.1)]
    rs = R.RewardSet(specs)
    samples = [{"prompt": "Name it", "answer": "Paris", "task": "qa"},
               {"prompt": "Count", "task": "count"}]
    texts = ["<think>t</think>Paris", "<think>t</think>abc"]
    out = rs.score(texts, samples)
    assert out["total"] == pytest.approx([1.0 + 1.0 + 0.1, 0.5 * len(texts[1]) + 0.1])
    assert out["accuracy"][0] == 1.0 and out["accuracy"][1] != out["accuracy"][1]  # NaN
    assert out["per_reward"] == pytest.approx({"callable": len(texts[1]), "judge": 1.0,
                                               "em": 1.0, "format": 1.0})
    with pytest.raises(ValueError, match="no reward applies to task 'other'"):
        R.RewardSet(specs[:1]).score(["x"], [{"prompt": "p", "task": "other"}])
    with pytest.raises(ValueError, match="module:function"):
        R.build_reward(R.RewardSpec(name="callable", function="no_colon"))
    assert R.reference_in_reply_judge("q", "It is paris.", "Paris") == 1.0


def test_reward_model_scores_p_yes(tmp_path):
    """The YesNoScorer's documented definition: P(yes) / (P(yes) + P(no)) at the next token
    after the rendered judge prompt."""
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config
    from qwen3_fast.tokenizer_train import build_test_tokenizer

    tok = build_test_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config.from_name("Qwen3-0.6B", vocab_size=512, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # make the two answers' logits clearly different
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    sample = {"prompt": "What is 2 + 2?", "answer": "4"}
    scorer = R.YesNoScorer(str(tmp_path))
    reply = "<think>add</think>4"
    conv = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": R.YesNoScorer.REWARD_QUESTION}]
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=False)
    assert scorer.prompt_ids(sample, reply) == ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    y, n = logits[tok.encode("yes")[0]], logits[tok.encode("no")[0]]
    want = float(torch.sigmoid(y - n))
    assert scorer.reward(reply, sample) == pytest.approx(want, rel=1e-4)
    judged = scorer.judge(reply, sample)
    assert 0.0 <= judged <= 1.0 and judged != pytest.approx(want, rel=1e-6)
    fn = R.build_reward(R.RewardSpec(name="reward_model", path=str(tmp_path)))
    assert fn(reply, sample) == pytest.approx(want, rel=1e-4)
