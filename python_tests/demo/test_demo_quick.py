"""`qwen3-fast demo --quick` end to end (every stage through the real recipes) and a rerun
that resumes. ~1.5-2.5 minutes on a 2-core CPU."""
import json
import math
import os

import pytest

from qwen3_fast.cli import main as cli_main


def _num(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli_main(["demo", "--quick", "--out", out]) == 0
    fig = json.load(open(os.path.join(out, "figures.json")))
    report = open(os.path.join(out, "report.md")).read()
    names = ("s1", "s2", "s3", "cold_start", "reasoning_rl", "fusion", "general_rl",
             "student_base", "off_policy", "on_policy", "student_cold_start", "student_rl")
    for n in names:
        e = fig["stages"][n]
        assert os.path.isfile(os.path.join(out, n, "model", "config.json")), n
        assert os.path.isfile(os.path.join(out, n, "model", "tokenizer.json")), n
        assert _num(e["metrics_first_loss"]) and _num(e["metrics_last_loss"]), n
        assert e["train_cpu_seconds"] > 0, n
        for k in ("acc_think", "acc_no_think", "mode_following"):
            if k in e:
                assert 0.0 <= e[k] <= 1.0, (n, k)
        assert f"| {n} |" in report
    for n in ("cold_start", "fusion", "general_rl", "on_policy", "student_rl"):
        assert "acc_think" in fig["stages"][n]
    for n in ("reasoning_rl", "general_rl", "student_rl"):
        assert _num(fig["stages"][n]["reward_first"]) and _num(fig["stages"][n]["entropy_last"])
    assert all(0.0 <= v <= 1.0 for v in fig["budget_curve"].values())
    for route in ("distillation", "rl"):
        r = fig["student"][route]
        assert 0.0 <= r["pass@1"] <= r["pass@2"] <= 1.0 and r["cpu_seconds"] > 0
    sp = fig["speculative"]
    assert 0.0 <= sp["acceptance_rate"] <= 1.0 and sp["speedup"] > 0
    assert sp["same_output_fraction"] == 1.0  # greedy speculative = greedy plain
    for title, rel in fig["plots"].items():
        assert os.path.getsize(os.path.join(out, rel)) > 1000, title
        assert f"]({rel})" in report
    assert len(fig["plots"]) == 6
    capsys.readouterr()
    # a rerun resumes: every stage is skipped, the report is rewritten
    assert cli_main(["demo", "--quick", "--out", out]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == len(names) + 1
