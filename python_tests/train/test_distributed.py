"""2-process gloo FSDP2 (torchrun) against 1 process with the same global batch, and a
sharded checkpoint written by 2 ranks resumed by 1 (DCP resharding)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import qwen3_fast
from qwen3_fast.train.trainer import train

from train_testlib import RECIPES, metrics, one_thread, tiny_config  # noqa: F401

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

COMMON = ["precision=fp32", "save_every=2", "grad_accum=2"]


def test_fsdp2_two_ranks_match_one_process_and_reshard_on_resume(tmp_path, one_thread):
    two = tmp_path / "two"
    # the ranks import the same qwen3_fast as this process (installed, or the source tree)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(qwen3_fast.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pkg_root + os.pathsep +
               os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "qwen3_fast.train", "--config", str(RECIPES / "s1_tiny.yaml"),
           f"output_dir={two}", "steps=3", "stop_after=2", "micro_batch_size=1",
           "progress=false", *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses_two = [r["loss"] for r in metrics(two)]
    assert len(losses_two) == 2
    shards = os.listdir(two / "checkpoints" / "step_00000002" / "dcp")
    assert sum(f.endswith(".distcp") for f in shards) == 2  # one shard file per rank

    # one process, the same 4 rows per step (2 per micro-step instead of 1 per rank)
    one = train(tiny_config("s1_tiny", tmp_path / "one", "steps=3", "micro_batch_size=2",
                            *COMMON))
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(one[:2]), rtol=2e-6,
                               atol=0)
    # the 2-rank sharded checkpoint, resumed by 1 process, continues the same trajectory
    resumed = train(tiny_config("s1_tiny", two, "steps=3", "micro_batch_size=2", *COMMON))
    assert len(resumed) == 1
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(one[2:]), rtol=2e-6, atol=0)
