"""``qwen3-fast generate`` / ``qwen3-fast chat`` on a tiny checkpoint: JSON output, streaming
text, /think and /no_think toggles, and one-line errors (exit status 2, no traceback)."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from gen_testlib import one_thread, tiny_model_dir  # noqa: F401 (autouse fixture)
from qwen3_fast import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cli"))


def test_generate_json_and_streamed_text_agree(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--prompt", "Hello", "--no-think",
            "--max-new-tokens", "8", "--temperature", "0", "--max-seq-len", "128"]
    assert cli.main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["completion_tokens"] == len(res["token_ids"]) <= 8
    assert res["finish_reason"] in ("stop", "length") and res["prompt_tokens"] > 0
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == res["text"] + "\n"  # no ANSI codes when stdout is not a tty
    assert "tokens/s" in captured.err
    assert cli.main(args + ["--kv-cache", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] >= 1


def test_chat_toggles_and_history(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/no_think\nand now?\n/think\n/exit\nx\n"))
    args = ["chat", "--model", model_dir, "--max-new-tokens", "5", "--temperature", "0",
            "--max-seq-len", "256"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "thinking off" in out and "thinking on" in out
    assert out.count("tokens/s") == 2  # two user turns answered, the line after /exit unread


def test_generate_speculative_reports_acceptance(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--prompt", "Hello", "--no-think",
            "--max-new-tokens", "12", "--temperature", "0", "--max-seq-len", "128",
            "--speculative", "--gamma", "3"]
    assert cli.main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["speculative"]["drafted"] > 0 and 0 <= res["speculative"]["acceptance_rate"] <= 1
    assert cli.main(args) == 0
    assert "acceptance" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"),
    (["--max-seq-len", "4"], "max_seq_len"), (["--speculative", "--gamma", "x"], "gamma")])
def test_errors_are_one_line(model_dir, capsys, extra, match):
    args = ["generate", "--model", model_dir, "--prompt", "Hello world, a longer prompt",
            "--max-new-tokens", "4"]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_model_dir_through_the_entry_point(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "qwen3_fast.cli", "generate", "--model",
                        str(tmp_path / "missing"), "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert cli.main(["chat", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "config" in err and "Traceback" not in err
