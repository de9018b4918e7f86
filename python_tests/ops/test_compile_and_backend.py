"""Cross-op checks: torch.compile(fullgraph=True) over a block using the ops, and the
backend selection rules of qwen3_fast.ops._backend."""
from __future__ import annotations

import importlib

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


# ------------------------------------------------------------------ call_op (eager inference)
def _spy_eager(monkeypatch, op):
    calls = []
    impl = op.eager_impl
    monkeypatch.setattr(op, "eager_impl", lambda *a: calls.append(1) or impl(*a))
    return calls


@pytest.mark.skipif(not _ext.available(), reason="_C not built")
def test_call_op_skips_the_dispatcher_only_in_eager_inference(monkeypatch):
    linear_mod = importlib.import_module("qwen3_fast.ops.linear")  # ops.linear: the function
    calls = _spy_eager(monkeypatch, linear_mod._linear_fwd)
    # bf16 on the CPU: the shape ops.linear sends to its kernel (fp32 goes to F.linear)
    x = torch.randn(3, 8).bfloat16()
    w = torch.nn.Parameter(torch.randn(5, 8).bfloat16())
    with torch.inference_mode():
        y = ops.linear(x, w)
    assert len(calls) == 1 and torch.allclose(y.float(), x.float() @ w.detach().float().t(),
                                              atol=0.1)
    with torch.no_grad():
        ops.linear(x, w)
    assert len(calls) == 2
    y = ops.linear(x, w)  # grad mode and a parameter that requires grad: autograd
    assert len(calls) == 2 and y.grad_fn is not None
    y.sum().backward()
    assert w.grad is not None and torch.allclose(w.grad.float(), x.float().sum(0).expand(5, 8),
                                                 atol=0.1)
    ops.linear(x, w.detach())  # nothing requires grad: eager, even in grad mode
    assert len(calls) == 3


@pytest.mark.skipif(not _ext.available(), reason="_C not built")
def test_call_op_keeps_modes_tracing_and_profiling_on_the_dispatcher(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    rms_mod = importlib.import_module("qwen3_fast.ops.rms_norm")
    calls = _spy_eager(monkeypatch, rms_mod._rms_norm_fwd)
    x, w = torch.randn(4, 16), torch.ones(16)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.inference_mode():
        with Record() as mode:
            ops.rms_norm(x, w)
        assert any("rms_norm_fwd" in n for n in mode.names) and not calls
        with torch.profiler.profile() as prof:
            ops.rms_norm(x, w)
        assert not calls
        assert any("rms_norm_fwd" in e.name for e in prof.events())
    fn = torch.compile(lambda t: ops.rms_norm(t, w), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(fn(x), ops.rms_norm(x, w))
    assert len(calls) == 1  # the eager call on the right; the compiled one went through the op
