"""The demo's stage runner with fast fake stages: DONE files, resume, crash reporting; and
the report from fake stage results."""
import json
import math
import os

from qwen3_fast.demo.pipeline import Stage, read_done, run_stages
from qwen3_fast.demo.report import write_report


def _stages(calls, fail=None):
    def train(name):
        def fn(stage_dir):
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"boom in {name}")
            with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
                for step in range(1, 4):
                    f.write(json.dumps({"step": step, "loss": 3.0 / step,
                                        "reward": 0.1 * step, "entropy": 1.0}) + "\n")
            return [3.0, 1.5, 1.0]
        return fn

    def evaluate(stage_dir):
        return {"acc_think": 0.5, "acc_no_think": 0.25, "acc_think_multi_step": 0.5,
                "acc_no_think_multi_step": 0.2, "mode_following": 0.75}

    return [Stage(name=n, recipe="fake", train=train(n), evaluate=evaluate)
            for n in ("s1", "cold_start", "general_rl")]


def test_resume_skips_done_stages(tmp_path, capsys):
    out = str(tmp_path)
    calls = []
    assert run_stages(out, _stages(calls)) == 0
    assert calls == ["s1", "cold_start", "general_rl"]
    d = read_done(out, "cold_start")
    assert d["figures"]["acc_think"] == 0.5 and d["last_loss"] == 1.0
    assert d["train_seconds"] >= 0 and d["train_cpu_seconds"] >= 0
    calls.clear()
    assert run_stages(out, _stages(calls)) == 0
    assert calls == []
    assert "done earlier, skipped" in capsys.readouterr().out
    os.remove(os.path.join(out, "general_rl", "DONE"))
    assert run_stages(out, _stages(calls)) == 0
    assert calls == ["general_rl"]


def test_crash_names_the_stage_and_keeps_earlier_ones(tmp_path, capsys):
    out = str(tmp_path)
    calls = []
    assert run_stages(out, _stages(calls, fail="cold_start")) == 1
    err = capsys.readouterr().err
    assert "stage 'cold_start' failed: RuntimeError: boom in cold_start" in err
    assert "earlier stages kept: s1" in err
    assert calls == ["s1", "cold_start"]  # nothing after the failed stage ran
    assert read_done(out, "s1") is not None and read_done(out, "cold_start") is None
    calls.clear()  # the rerun resumes at the failed stage
    assert run_stages(out, _stages(calls)) == 0
    assert calls == ["cold_start", "general_rl"]


def test_report_from_stage_results(tmp_path):
    out = str(tmp_path)
    stages = _stages([])
    assert run_stages(out, stages) == 0
    path = write_report(out, stages, {"steps": {}}, quick=True)
    text = open(path).read()
    assert "| cold_start |" in text and "![Loss per stage](plots/losses.png)" in text
    fig = json.load(open(os.path.join(out, "figures.json")))
    assert fig["stages"]["general_rl"]["reward_last"] > fig["stages"]["general_rl"]["reward_first"]
    assert fig["checks"]["rl_raises_reward"] == {"general_rl": True}
    assert fig["checks"]["think_beats_no_think_multi_step"] is True
    assert fig["checks"]["mode_following_ge_0.9"] is False
    assert "NO: mode-following stayed under 90%" in text
    for rel in fig["plots"].values():
        assert os.path.getsize(os.path.join(out, rel)) > 1000
    assert all(math.isfinite(v) for v in (fig["stages"]["s1"]["metrics_last_loss"],))


def test_refuses_to_mix_settings_in_one_output_dir(tmp_path, capsys):
    from qwen3_fast.demo import main

    (tmp_path / "demo_args.txt").write_text("quick=True moe=False seed=0\n")
    assert main(["--out", str(tmp_path)]) == 2  # a default run into a --quick run's dir
    assert "holds a demo run with quick=True" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
