"""Every Triton kernel compiles for sm_90 without a GPU (python_tests/ops/triton_aot.py).

The interpreter runs kernels the compiler rejects (the grouped GEMM's int32 -> int64
loop-carried offsets did, until the first H200 run); this test compiles each kernel
specialization the ops launch, in a fresh Triton cache so nothing is taken from earlier runs.

    pytest python_tests/ops/test_triton_compile.py     # about 2 minutes on 2 CPU cores
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "triton_aot.py")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]


def _run(mode: str, specs: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, mode, specs], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    specs = str(tmp_path / "specs.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    got = _run("capture", specs, {**env, "TRITON_INTERPRET": "1"})
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert "captured" in got.stdout
    n = int(got.stdout.split("captured ")[1].split()[0])
    assert n >= 40, f"only {n} kernel specializations were launched: {got.stdout}"
    got = _run("compile", specs, env)
    failures = [line for line in got.stdout.splitlines() if line.startswith("FAILED")]
    assert got.returncode == 0 and not failures, "\n".join(failures) or got.stderr[-3000:]
    assert f"compiled {n} specializations" in got.stdout


def test_capture_records_types_and_constexprs():
    sys.path.insert(0, HERE)
    import torch
    from triton_aot import _arg_type
    assert _arg_type(torch.zeros(1, dtype=torch.bfloat16)) == "*bf16"
    assert _arg_type(torch.zeros(1, dtype=torch.int64)) == "*i64"
    assert (_arg_type(3), _arg_type(2**40), _arg_type(0.5), _arg_type(True)) == \
        ("i32", "i64", "fp32", "i1")
    assert _arg_type(None) is None
    with pytest.raises(TypeError, match="unsupported"):
        _arg_type("x")
