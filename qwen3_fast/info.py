"""What this install of qwen3_fast was built with, and which backend each op uses.

Run ``python -m qwen3_fast.info`` (or ``qwen3-fast info``; ``--json`` for machine output).
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from qwen3_fast import _ext


def collect() -> dict:
    from qwen3_fast import ops
    from qwen3_fast.ops import _backend
    from qwen3_fast.ops.grouped_gemm import sm90_kernel_built

    built = _ext.extension().build_info() if _ext.available() else {}
    info = {
        "qwen3_fast": __import__("qwen3_fast").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "extension_built": _ext.available(),
        "cpu_features": list(built.get("cpu_features", [])),
        "openmp": bool(built.get("openmp", False)),
        "compiler": built.get("compiler", ""),
        "cuda_kernels_built": bool(built.get("cuda", False)),
        "cuda_compiler": built.get("cuda_version", ""),
        "cuda_archs": built.get("cuda_archs", "").split(),
        "cutlass_version": built.get("cutlass_version", ""),
        "cutlass_source": built.get("cutlass_source", "none"),
        "cutlass_in_build": bool(built.get("cutlass_in_build", False)),
        # the CUTLASS sm_90a grouped GEMM (grouped_gemm(..., backend="cutlass")) is compiled in
        "grouped_gemm_sm90": sm90_kernel_built(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_available": _backend.triton_available(),
        "forced_backend": _backend.get_backend(),
        "ops": {
            op: {"cpu": _backend.default_backend(op, "cpu"),
                 "cuda": _backend.default_backend(op, "cuda"),
                 "gpu_verified": list(_backend.GPU_VERIFIED.get(op, ()))}
            for op in ops.OPS
        },
    }
    return info


def format_info(info: dict) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        f"qwen3_fast {info['qwen3_fast']}  torch {info['torch']}  python {info['python']} ({info['machine']})",
        f"extension qwen3_fast._C built: {yes(info['extension_built'])}"
        + (f"  ({info['compiler']}, OpenMP {yes(info['openmp'])})" if info["extension_built"] else ""),
        f"CPU features compiled for: {', '.join(info['cpu_features']) or 'baseline'}",
        f"CUDA kernels built: {yes(info['cuda_kernels_built'])}"
        + (f"  (nvcc {info['cuda_compiler']}, archs {', '.join(info['cuda_archs'])})"
           if info["cuda_kernels_built"] else ""),
        f"CUTLASS: {info['cutlass_version'] or 'not found'} from {info['cutlass_source']}"
        f" (used in this build: {yes(info['cutlass_in_build'])}; sm_90a grouped GEMM: "
        f"{yes(info['grouped_gemm_sm90'])})",
        f"CUDA device: {info['cuda_device'] or 'none'}",
        f"Triton available: {yes(info['triton_available'])}",
        f"forced backend: {info['forced_backend'] or 'none (per-device default)'}",
        "",
        f"{'op':<16}{'CPU tensors':<14}{'CUDA tensors':<14}GPU-verified kernels",
    ]
    for op, row in info["ops"].items():
        verified = ", ".join(row["gpu_verified"]) or "none yet (bench/gpu_check.sh)"
        lines.append(f"{op:<16}{row['cpu']:<14}{row['cuda']:<14}{verified}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
