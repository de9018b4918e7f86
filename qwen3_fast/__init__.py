"""qwen3_fast: run and train Qwen3 (dense and MoE) fast.

`qwen3_fast.ops` holds the kernels as torch custom ops; `Qwen3ForCausalLM` /
`Qwen3Config` load Hugging Face Qwen3 checkpoints; `Qwen3Tokenizer` carries the Qwen3 chat
format; `build_info()` says what the compiled extension `qwen3_fast._C` contains (also
`python -m qwen3_fast.info`).
"""
from __future__ import annotations

import glob as _glob
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _extend_path_to_compiled_extension() -> None:
    # Running from a source checkout (`python -m ...` in the repo root puts the checkout
    # first on sys.path) after `pip install .`: the Python files come from the checkout,
    # and the compiled _C from the installed copy, found here. Nothing changes when the
    # package is imported from site-packages, where _C sits next to this file.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _glob.glob(_os.path.join(here, "_C.*")):
        return
    for entry in _sys.path:
        candidate = _os.path.join(entry or _os.getcwd(), "qwen3_fast")
        if _os.path.realpath(candidate) == _os.path.realpath(here):
            continue
        if _glob.glob(_os.path.join(candidate, "_C.*")):
            __path__.append(candidate)  # type: ignore[name-defined]
            return


_extend_path_to_compiled_extension()


def build_info() -> dict:
    """What was built and which backend each op uses; see `qwen3_fast.info`."""
    from qwen3_fast.info import collect

    return collect()


_LAZY = {
    "Qwen3Config": "qwen3_fast.model",
    "Qwen3ForCausalLM": "qwen3_fast.model",
    "Qwen3MoeForCausalLM": "qwen3_fast.model",
    "CausalLMOutput": "qwen3_fast.model",
    "Qwen3Tokenizer": "qwen3_fast.tokenizer",
    "LLM": "qwen3_fast.generate",
    "SamplingParams": "qwen3_fast.generate",
    "QuantSpecConfig": "qwen3_fast.generate",
}


def __getattr__(name: str):
    # Submodules and classes load lazily so `import qwen3_fast` stays cheap.
    import importlib

    if name in ("ops", "model", "tokenizer", "chat_format"):
        return importlib.import_module(f"qwen3_fast.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen3_fast' has no attribute {name!r}")
