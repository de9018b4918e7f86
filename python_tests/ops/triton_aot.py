"""Compile every Triton kernel for real GPUs ahead of time, on a machine without one.

The interpreter (TRITON_INTERPRET=1, how CI runs the Triton tests) does not type-check a
kernel the way the compiler does: a loop-carried variable that changes from int32 to int64,
for one, runs fine interpreted and fails to compile (the first H200 run found exactly that in
the grouped GEMM). This script closes the gap in two processes:

    python triton_aot.py capture SPECS.json     # TRITON_INTERPRET=1: run every Triton op
                                                # (forward and backward, fp32/bf16/fp16) on
                                                # CPU tensors and record each kernel launch's
                                                # argument types and constexpr values
    python triton_aot.py compile SPECS.json     # no interpreter: triton.compile each recorded
                                                # specialization for sm_90 (more archs on request) with
                                                # the NVIDIA backend (ptxas ships with triton)

python_tests/ops/test_triton_compile.py runs both. What it cannot catch: numerical
differences between compiled and interpreted code (FMA contraction, approximate division);
only the GPU tests (marked cuda) see those.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

# sm_90 (H100/H200, what bench/gpu_check.sh runs on); pass more on the command line (80: A100)
ARCHS = (90,)

_TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
                    "torch.float64": "fp64", "torch.int64": "i64", "torch.int32": "i32",
                    "torch.int16": "i16", "torch.int8": "i8", "torch.uint8": "u8",
                    "torch.bool": "i1"}


def _arg_type(value) -> str | None:
    """Triton signature type of a runtime argument (None: a constexpr-like None)."""
    import torch
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _record_launches(specs: dict) -> None:
    """Patch the interpreter so each kernel launch adds its specialization to `specs`."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}  # num_warps..
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for name, value in bound.arguments.items():
            if params[name].annotation in ("constexpr", "tl.constexpr") or \
                    getattr(params[name].annotation, "__name__", "") == "constexpr":
                signature[name] = "constexpr"
                constexprs[name] = value
            else:
                t = _arg_type(value)
                signature[name] = t if t is not None else "constexpr"
                if t is None:
                    constexprs[name] = None
        spec = {"module": self.fn.__module__, "kernel": self.fn.__name__,
                "signature": signature, "constexprs": constexprs, "options": options}
        specs[json.dumps(spec, sort_keys=True)] = spec
        return original(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    InterpretedFunction.run = run


def _exercise_ops() -> None:
    """Every Triton kernel, forward and backward, in each dtype it is used with."""
    import torch

    from qwen3_fast import ops
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]  # test_flash_decode imports conftest
    from test_flash_decode import make_caches

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=gen).to(dtype)
        return t.requires_grad_() if grad else t

    with ops.use_backend("triton"):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x, r = rand(5, 96, dtype=dt, grad=True), rand(5, 96, dtype=dt, grad=True)
            w = rand(96, dtype=dt, grad=True)
            ops.rms_norm(x, w).sum().backward()
            ops.rms_norm(x[:, :48], rand(48, grad=True)).sum().backward()  # strided, fp32 w
            y, s = ops.add_rms_norm(x, r, w)
            (y.sum() + s.sum()).backward()
            ops.silu_and_mul(rand(5, 2 * 48, dtype=dt, grad=True)).sum().backward()

            q, k = rand(7, 4, 64, dtype=dt, grad=True), rand(7, 2, 64, dtype=dt, grad=True)
            cos, sin = rand(16, 64), rand(16, 64)
            qo, ko = ops.qk_norm_rope(q, k, rand(64, dtype=dt, grad=True),
                                      rand(64, dtype=dt, grad=True), cos, sin,
                                      torch.arange(7))
            (qo.sum() + ko.sum()).backward()
            with torch.no_grad():  # the in-place inference path
                ops.qk_norm_rope(q.detach().clone(), k.detach().clone(), rand(64, dtype=dt),
                                 rand(64, dtype=dt), cos, sin, torch.arange(7))

            for kind, shape, g in (("key", (2, 32, 16), 16), ("value", (3, 64), 32)):
                ops.kv_quantize(rand(*shape, dtype=dt), kind, g)
            dense, hier, _, _ = make_caches([5, 40], hkv=2, d=64, g=16, dtype=dt,
                                            decode_steps=2)
            for n in (1, 3):
                qd = rand(2, 4, n, 64, dtype=dt)
                for prec, cache in ((16, dense), (8, hier), (4, hier)):
                    ops.flash_decode(qd, cache, 0, prec)

            a = rand(9, 32, dtype=dt, grad=True)
            offsets = torch.tensor([0, 4, 4, 9])
            for trans_b, bshape in ((False, (3, 32, 24)), (True, (3, 24, 32))):
                ops.grouped_gemm(a, rand(*bshape, dtype=dt, grad=True), offsets,
                                 trans_b).sum().backward()

            h, lm = rand(6, 32, dtype=dt, grad=True), rand(50, 32, dtype=dt, grad=True)
            labels = torch.tensor([1, 2, -100, 4, 49, 0])
            ops.linear_cross_entropy(h, lm, labels).backward()
            th, tw = rand(6, 24, dtype=dt), rand(50, 24, dtype=dt)
            ops.linear_jsd(h, lm, th, tw, labels).backward()
            lp, ent = ops.linear_logprobs(h, lm, labels.clamp(min=0), temperature=0.7)
            (lp.sum() + ent.sum()).backward()


def capture(path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("capture needs TRITON_INTERPRET=1 set before triton is imported")
    specs: dict = {}
    _record_launches(specs)
    _exercise_ops()
    with open(path, "w") as f:
        json.dump(sorted(specs.values(), key=lambda s: json.dumps(s, sort_keys=True)), f,
                  indent=1)
    print(f"captured {len(specs)} kernel specializations")


def _compile_one(job) -> str | None:
    """triton.compile one (spec, arch); the failure line, or None."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, arch = job
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    try:
        src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"] or None)
    except Exception as exc:  # every failing kernel is reported, not only the first
        return (f"{spec['kernel']} sm_{arch} {spec['signature']} {spec['constexprs']}: "
                f"{type(exc).__name__}: {str(exc)[-800:]}")
    return None


def compile_all(path: str, archs=ARCHS, workers: int | None = None) -> list[str]:
    """triton.compile each recorded specialization for each arch; one line per failure."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile must run without TRITON_INTERPRET")
    from concurrent.futures import ProcessPoolExecutor

    with open(path) as f:
        specs = json.load(f)
    jobs = [(spec, arch) for spec in specs for arch in archs]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        failures = [r for r in pool.map(_compile_one, jobs) if r is not None]
    print(f"compiled {len(specs)} specializations for sm_{archs}: {len(failures)} failed")
    for line in failures:
        print("FAILED", line)
    return failures


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("capture", "compile"):
        raise SystemExit("usage: triton_aot.py capture SPECS.json | compile SPECS.json [ARCH..]")
    if sys.argv[1] == "capture":
        capture(sys.argv[2])
    else:
        archs = tuple(int(a) for a in sys.argv[3:]) or ARCHS
        sys.exit(1 if compile_all(sys.argv[2], archs) else 0)
