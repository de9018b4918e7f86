"""Loads the compiled extension qwen3_fast._C once, at import, and says why when it cannot.

Loaded eagerly (not on first use) so that the per-call backend choice reads plain module
globals, which torch.compile traces without graph breaks.
"""
from __future__ import annotations

import importlib
from types import ModuleType

try:
    _C: ModuleType | None = importlib.import_module("qwen3_fast._C")
    _ERROR = ""
except ImportError as e:  # not built (a source checkout without `pip install .`)
    _C = None
    _ERROR = str(e)

_AVAILABLE = _C is not None
_CUDA_BUILT = _AVAILABLE and hasattr(_C, "rms_norm_forward_cuda")


def extension() -> ModuleType:
    """The compiled module; raises RuntimeError with the fix when it is missing."""
    if _C is None:
        raise RuntimeError(
            f"qwen3_fast._C (the compiled kernels) is not available: {_ERROR}. Build it with "
            "`pip install .` in the repository root, or use QWEN3_FAST_BACKEND=reference."
        )
    return _C


def available() -> bool:
    return _AVAILABLE


def cuda_built() -> bool:
    return _CUDA_BUILT
