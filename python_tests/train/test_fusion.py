"""Thinking-mode fusion data (train/fusion.py): exact kind ratios, flag placement, empty
think blocks for non-thinking answers, multi-turn answers that follow the LAST flag, and the
tiny recipe's prebuilt mix being what the builder writes."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from qwen3_fast.chat_format import EMPTY_THINK, render_chat
from qwen3_fast.train.data import IGNORE_INDEX, load_tokenizer
from qwen3_fast.train.fusion import (KINDS, build_fusion_samples, last_flag_mode, main,
                                     read_jsonl, strip_flags, write_jsonl)
from qwen3_fast.train.sft_data import split_reply, tokenize_chat

from train_testlib import RECIPES

FLAG = re.compile(r"(?<!\S)/(no_)?think(?!\S)")


def _think(i):
    return {"messages": [{"role": "user", "content": f"T{i} question /no_think"},
                         {"role": "assistant", "reasoning_content": f"reason {i}",
                          "content": f"T{i} answer"}]}


def _plain(i):
    # reasoning given in the content's think block: the builder drops it for non-thinking
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"P{i} question"},
                         {"role": "assistant",
                          "content": f"<think>\nstale {i}\n</think>\n\nP{i} answer"}]}


THINKING = [_think(i) for i in range(5)]
PLAIN = [_plain(i) for i in range(4)]


def _flags(text):
    return [m.group(0) for m in FLAG.finditer(text)]


def _user_turns(messages):
    return [m["content"] for m in messages if m["role"] == "user"]


def test_kind_ratios_are_exact():
    ratios = {"think_flag": 1, "think_default": 1, "no_think": 2, "multi_turn": 1}
    mix = build_fusion_samples(THINKING, PLAIN, seed=1, num_samples=100, ratios=ratios)
    assert Counter(s["kind"] for s in mix) == {"think_flag": 20, "think_default": 20,
                                               "no_think": 40, "multi_turn": 20}
    odd = build_fusion_samples(THINKING, PLAIN, seed=1, num_samples=7,
                               ratios={"no_think": 1, "think_flag": 1})
    assert sorted(Counter(s["kind"] for s in odd).values()) == [3, 4]
    default = build_fusion_samples(THINKING, PLAIN, seed=0)
    assert len(default) == len(THINKING) + len(PLAIN)
    assert {s["kind"] for s in default} <= set(KINDS)
    # the kinds are shuffled, not in blocks
    assert [s["kind"] for s in mix[:20]] != sorted(s["kind"] for s in mix[:20])


def test_single_turn_flags_and_empty_think_block():
    tok = load_tokenizer("test")
    mix = build_fusion_samples(THINKING, PLAIN, seed=2, num_samples=60)
    seen = set()
    for s in mix:
        msgs, kind = s["messages"], s["kind"]
        if kind == "multi_turn":
            continue
        seen.add(kind)
        users = _user_turns(msgs)
        assert len(users) == 1
        flags = _flags(users[0])
        final = msgs[-1]
        _, reply, _ = split_reply(msgs)
        if kind == "think_flag":
            assert flags == ["/think"] and users[0].endswith(" /think")
        elif kind == "think_default":
            assert flags == []  # thinking is the default: no flag at all
        else:
            assert flags == ["/no_think"] and users[0].endswith(" /no_think")
        if kind == "no_think":
            assert s["mode"] == "no_think" and final["reasoning_content"] == ""
            assert final["content"].startswith("P") and "stale" not in render_chat(msgs)
            assert reply == EMPTY_THINK + final["content"] + "<|im_end|>"
            assert msgs[0] == {"role": "system", "content": "Be brief."}
        else:
            assert s["mode"] == "think" and final["reasoning_content"].startswith("reason")
            assert reply.startswith("<think>\n" + final["reasoning_content"] + "\n</think>")
        # the loss covers the (possibly empty) think block and the answer
        ids, labels = tokenize_chat(msgs, tok)
        assert tok.decode([y for y in labels if y != IGNORE_INDEX]) == reply
    assert seen == {"think_flag", "think_default", "no_think"}


def test_multi_turn_answers_follow_the_last_flag():
    mix = build_fusion_samples(THINKING, PLAIN, seed=3, num_samples=200,
                               ratios={"multi_turn": 1}, max_turns=4)
    finals, no_flag_last, turns = Counter(), 0, Counter()
    for s in mix:
        msgs = s["messages"]
        users = _user_turns(msgs)
        turns[len(users)] += 1
        assert 2 <= len(users) <= 4
        assert all(m["role"] != "system" for m in msgs[1:])
        mode = "think"
        replies = [m for m in msgs if m["role"] == "assistant"]
        for user, reply in zip(users, replies):  # every reply follows the flags so far
            flags = _flags(user)
            assert len(flags) <= 1 and (not flags or user.endswith(" " + flags[0]))
            if flags:
                mode = "think" if flags[0] == "/think" else "no_think"
            assert (reply["reasoning_content"] != "") == (mode == "think"), (user, reply)
        assert s["mode"] == mode == last_flag_mode(msgs)
        finals[mode] += 1
        no_flag_last += not _flags(users[-1])
        _, reply, _ = split_reply(msgs)  # the final answer's rendering follows the mode
        assert reply.startswith(EMPTY_THINK) == (mode == "no_think")
    assert finals["think"] > 20 and finals["no_think"] > 20
    assert no_flag_last > 10  # cases where an EARLIER turn's flag decides the final mode
    assert set(turns) == {2, 3, 4}


def test_flags_and_determinism():
    assert strip_flags("a /think b /no_think") == "a b"
    assert strip_flags("path/think and /thinking stay") == "path/think and /thinking stay"
    assert last_flag_mode([{"role": "user", "content": "x /no_think"},
                           {"role": "assistant", "content": "y"},
                           {"role": "user", "content": "z /think"}]) == "think"
    assert last_flag_mode([{"role": "user", "content": "x /no_think"},
                           {"role": "assistant", "content": "y"},
                           {"role": "user", "content": "z"}]) == "no_think"
    a = build_fusion_samples(THINKING, PLAIN, seed=5, num_samples=30)
    assert a == build_fusion_samples(THINKING, PLAIN, seed=5, num_samples=30)
    assert a != build_fusion_samples(THINKING, PLAIN, seed=6, num_samples=30)
    # the inputs' own flags are removed: think samples said /no_think in their user turn
    for s in a:
        if s["kind"] in ("think_flag", "think_default"):
            assert "/no_think" not in _user_turns(s["messages"])[0]
    assert THINKING[0]["messages"][0]["content"].endswith("/no_think")  # inputs untouched


def test_refuses_bad_inputs():
    with pytest.raises(ValueError, match="needs reasoning"):
        build_fusion_samples([[{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}]], PLAIN, seed=0)
    with pytest.raises(ValueError, match="at least one sample"):
        build_fusion_samples(THINKING, [], seed=0)
    with pytest.raises(ValueError, match="ratios"):
        build_fusion_samples(THINKING, PLAIN, ratios={"think": 1})
    with pytest.raises(ValueError, match="max_turns"):
        build_fusion_samples(THINKING, PLAIN, max_turns=1)


def test_jsonl_and_the_tiny_recipe_mix(tmp_path, capsys):
    mix = build_fusion_samples(THINKING, PLAIN, seed=0, num_samples=9)
    assert write_jsonl(mix, tmp_path / "m.jsonl") == 9
    assert read_jsonl(tmp_path / "m.jsonl") == mix
    # recipes/data/sft_fusion_tiny.jsonl is exactly what the builder writes (its header)
    data = RECIPES / "data"
    out = tmp_path / "fusion.jsonl"
    assert main(["--thinking", str(data / "sft_thinking_tiny.jsonl"), "--non-thinking",
                 str(data / "sft_non_thinking_tiny.jsonl"), "--out", str(out), "--seed", "0",
                 "--num-samples", "12"]) == 0
    assert "wrote 12 samples" in capsys.readouterr().out
    assert read_jsonl(out) == read_jsonl(data / "sft_fusion_tiny.jsonl")
    assert {s["kind"] for s in read_jsonl(out)} == set(KINDS)
