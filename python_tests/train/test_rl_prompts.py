"""RL prompt sets (train/rl_prompts.py): record checks, weighted mix, epochs, resume."""
from __future__ import annotations

import json

import pytest

from qwen3_fast.train.config import SourceConfig
from qwen3_fast.train.rl_prompts import PromptSource, load_records


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_mix_epochs_and_exact_resume(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "task": "A"} for i in range(5)])
    b = _write(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "task": "B"} for i in range(3)])
    sources = [SourceConfig(path=a, weight=3.0), SourceConfig(path=b, weight=1.0)]
    src = PromptSource(sources, seed=1)
    draws = [src.next()["prompt"] for _ in range(400)]
    share_a = sum(d.startswith("a") for d in draws) / len(draws)
    assert 0.68 < share_a < 0.82  # weight 3 : 1
    # each epoch of a source visits every record once, in a fresh order
    first_a = [d for d in draws if d.startswith("a")][:10]
    assert sorted(first_a[:5]) == sorted(first_a[5:]) == [f"a{i}" for i in range(5)]
    state = src.state_dict()
    want = [src.next()["prompt"] for _ in range(20)]
    other = PromptSource(sources, seed=1)
    other.load_state_dict(json.loads(json.dumps(state)))  # the state is JSON
    assert [other.next()["prompt"] for _ in range(20)] == want


def test_bad_records_are_named(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'messages' must be a list ending "
                                         "with a user turn"):
        load_records(SourceConfig(path=bad))
    odd = _write(tmp_path / "odd.jsonl", [{"text": "no prompt"}])
    with pytest.raises(ValueError, match="odd.jsonl:1: expected 'messages'"):
        load_records(SourceConfig(path=odd))
    flag = _write(tmp_path / "flag.jsonl", [{"prompt": "p", "enable_thinking": "yes"}])
    with pytest.raises(ValueError, match="enable_thinking"):
        load_records(SourceConfig(path=flag))
