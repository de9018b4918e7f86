"""Cross-op checks: torch.compile(fullgraph=True) over a block using the ops, and the
backend selection rules of qwen3_fast.ops._backend."""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import _ext, ops
from qwen3_fast.ops import _backend, reference


class TinyBlock(torch.nn.Module):
    """residual add + norm -> gate_up projection -> SwiGLU -> down -> final norm."""

    def __init__(self, hidden=32, inter=48):
        super().__init__()
        self.norm = ops.RMSNorm(hidden)
        self.gate_up = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.final = ops.RMSNorm(hidden)

    def forward(self, x, residual):
        h, residual = ops.add_rms_norm(x, residual, self.norm.weight, 1e-6)
        h = self.down(ops.silu_and_mul(self.gate_up(h)))
        return self.final(h + residual)


@pytest.mark.skipif(not _ext.available(), reason="_C not built")
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(compile_backend):
    torch.manual_seed(0)
    block = TinyBlock()
    x = torch.randn(2, 5, 32, requires_grad=True)
    r = torch.randn(2, 5, 32)
    eager = block(x, r)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    out = compiled(x, r)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-5)


def test_forced_backend_routes_to_reference(monkeypatch):
    calls = []
    original = reference.rms_norm
    monkeypatch.setattr(reference, "rms_norm", lambda *a: calls.append(1) or original(*a))
    x, w = torch.randn(3, 8), torch.randn(8)
    with ops.use_backend("reference"):
        ops.rms_norm(x, w)
    assert calls == [1]
    assert ops.get_backend() is None


def test_default_backends():
    expected_cpu = "cpu" if _ext.available() else "reference"
    for op in ops.OPS:
        assert _backend.default_backend(op, "cpu") == expected_cpu
        # CUDA tensors: the first GPU-verified backend usable here, else the reference
        usable = [b for b in _backend.GPU_VERIFIED[op] if _backend.backend_usable(b, "cuda")[0]]
        assert _backend.default_backend(op, "cuda") == (usable + ["reference"])[0], op
    assert _backend.GPU_VERIFIED["rms_norm"][0] == "cuda"  # the 2026-11-29 H200 run
    assert _backend.GPU_VERIFIED["moe_permute"] == ()  # its CUDA sort changed after that run
    assert _backend.resolve("rms_norm", torch.zeros(1, dtype=torch.float64)) == "reference"


def test_bad_backend_names_and_unusable_backends():
    with pytest.raises(ValueError, match="backend 'tpu' is not one of"):
        ops.set_backend("tpu")
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        ops.rms_norm(torch.randn(2, 4), torch.randn(4))


def test_env_var_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="QWEN3_FAST_BACKEND: backend 'fast' is not one of"):
        _backend._validate("fast", "QWEN3_FAST_BACKEND")
