"""qwen3_fast.ops: the kernels as torch custom ops (namespace ``qwen3_fast``).

Every op follows the contract in DESIGN.md: a reference in :mod:`.reference`, CPU C++,
CUDA C++ and Triton kernels, ``torch.library.custom_op`` + fake + autograd, input checks.
The backend is chosen per call (:mod:`._backend`); force one with QWEN3_FAST_BACKEND or
:func:`set_backend`.
"""
from qwen3_fast.ops import reference
from qwen3_fast.ops._backend import BACKENDS, get_backend, set_backend, use_backend
from qwen3_fast.ops.add_rms_norm import add_rms_norm
from qwen3_fast.ops.rms_norm import RMSNorm, rms_norm
from qwen3_fast.ops.silu_and_mul import silu_and_mul

OPS = ("rms_norm", "add_rms_norm", "silu_and_mul")

__all__ = ["BACKENDS", "OPS", "RMSNorm", "add_rms_norm", "get_backend", "reference",
           "rms_norm", "set_backend", "silu_and_mul", "use_backend"]
