"""The three pre-training stages on tiny models, chained S1 -> S2 -> S3 through HF checkpoints,
the last one through the ``qwen3-fast train pretrain`` command line."""
from __future__ import annotations

import json

from qwen3_fast.cli import main as cli_main
from qwen3_fast.train.trainer import train

from train_testlib import RECIPES, metrics, one_thread, tiny_config  # noqa: F401 (fixture)


def _config(path):
    with open(path / "model" / "config.json", encoding="utf-8") as f:
        return json.load(f)


def test_s1_s2_s3_chain(tmp_path, one_thread):
    s1 = train(tiny_config("s1_tiny", tmp_path / "s1", "steps=6", "save_every=0",
                           "optim.warmup_steps=1"))
    assert s1[-1] < s1[0]
    assert _config(tmp_path / "s1")["rope_parameters"]["rope_theta"] == 1e4

    s2 = train(tiny_config("s2_tiny", tmp_path / "s2", "steps=4", "save_every=0",
                           f"model.init_from={tmp_path / 's1' / 'model'}"))
    assert s2[-1] < s2[0]
    assert s2[0] < s1[0] - 0.3  # it starts from S1's weights, not from scratch

    rc = cli_main(["train", "pretrain", "--config", str(RECIPES / "s3_tiny.yaml"),
                   f"output_dir={tmp_path / 's3'}", "steps=4", "save_every=0",
                   "progress=false", f"model.init_from={tmp_path / 's2' / 'model'}"])
    assert rc == 0
    s3 = [r["loss"] for r in metrics(tmp_path / "s3")]
    assert len(s3) == 4 and s3[-1] < s3[0]
    cfg = _config(tmp_path / "s3")  # ABF: the written config carries the new RoPE base
    assert cfg["rope_parameters"]["rope_theta"] == 1e6
    assert cfg["max_position_embeddings"] >= 512
    assert all(r["tokens"] == 2 * 512 for r in metrics(tmp_path / "s3"))


def test_cli_reports_config_errors(capsys):
    rc = cli_main(["train", "pretrain", "--config", str(RECIPES / "s1_tiny.yaml"), "steps=x"])
    assert rc == 2
    assert "steps: expected an int, got 'x'" in capsys.readouterr().err
