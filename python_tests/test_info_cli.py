"""python -m qwen3_fast.info and the qwen3-fast command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import qwen3_fast
from qwen3_fast import _ext, cli


def test_build_info_reports_build_and_backends():
    info = qwen3_fast.build_info()
    assert info["extension_built"] == _ext.available()
    from qwen3_fast import ops

    assert set(info["ops"]) == set(ops.OPS)
    assert {"rms_norm", "add_rms_norm", "silu_and_mul"} <= set(ops.OPS)
    for row in info["ops"].values():
        assert row["cpu"] in ("cpu", "reference")
        assert row["cuda"] in ("cuda", "triton", "reference")
    if info["extension_built"]:
        assert info["openmp"] is True
        assert info["cuda_kernels_built"] == _ext.cuda_built()
        if info["cuda_kernels_built"]:
            assert info["cuda_archs"], "a CUDA build must name its architectures"


def test_info_module_runs_as_a_script():
    out = subprocess.run([sys.executable, "-m", "qwen3_fast.info", "--json"], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out)["torch"]


def test_cli_info_table(capsys):
    assert cli.main(["info"]) == 0
    assert "rms_norm" in capsys.readouterr().out


@pytest.mark.skipif(not _ext.available(), reason="_C not built")
def test_cli_bench_ops_small(capsys):
    assert cli.main(["bench-ops", "--tokens", "4", "--hidden", "64", "--intermediate", "96"]) == 0
    out = capsys.readouterr().out
    assert out.count("speedup") == 3, out


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        cli.main(["bench-ops", "--tokens", "0"])
