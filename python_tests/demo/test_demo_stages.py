"""The demo's RL query filtering (stages.filter_rl_prompts) with a fake pass counter."""
import json

import pytest

from qwen3_fast.demo import evaluate, stages

SETTINGS = {"filter": {"candidates": 8, "k": 4, "min_keep": 3, "batch": 8},
            "rollout": {"max_new_tokens": 16}}


def _records(tmp_path, n=10):
    src = tmp_path / "rl.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}],
                                       "answer": str(i), "task": "sum"}) + "\n"
                           for i in range(n)))
    return str(src)


def _read(path):
    return [json.loads(line)["answer"] for line in open(path)]


@pytest.fixture
def fake_counts(monkeypatch):
    calls = []

    def set_counts(counts):
        def fake(model_dir, records, k, max_new_tokens, temperature=1.0, batch=128, seed=0):
            calls.append(len(records))
            assert k == 4 and max_new_tokens == 16
            return counts[:len(records)]
        monkeypatch.setattr(evaluate, "pass_counts", fake)
        return calls
    return set_counts


def test_keeps_the_prompts_solved_sometimes(tmp_path, fake_counts):
    calls = fake_counts([0, 1, 4, 2, 3, 0, 4, 1, 9, 9])
    dst = str(tmp_path / "kept.jsonl")
    stats = stages.filter_rl_prompts("model", _records(tmp_path), dst, SETTINGS)
    assert calls == [8]  # only the candidates are scored
    assert _read(dst) == ["1", "3", "4", "7"]
    assert stats["kept"] == stats["mixed"] == 4 and stats["candidates"] == 8
    assert stats["pass_histogram"] == [2, 2, 1, 1, 2]
    assert stats["candidate_pass_rate"] == pytest.approx(15 / 32)
    # a resumed stage reuses the file (the same prompt order) without scoring again
    assert stages.filter_rl_prompts("model", _records(tmp_path), dst, SETTINGS) == stats
    assert calls == [8]


def test_a_weak_policy_fills_up_with_unsolved_then_solved_prompts(tmp_path, fake_counts):
    fake_counts([0, 4, 0, 2, 4, 4, 4, 4])
    dst = str(tmp_path / "kept.jsonl")
    stats = stages.filter_rl_prompts("model", _records(tmp_path), dst,
                                     dict(SETTINGS, filter=dict(SETTINGS["filter"],
                                                                min_keep=4)))
    assert _read(dst) == ["3", "0", "2", "1"]
    assert stats["kept"] == 4 and stats["mixed"] == 1
