"""qwen3_fast.ops: the kernels as torch custom ops (namespace ``qwen3_fast``).

Every op follows the contract in DESIGN.md: a reference in :mod:`.reference`, CPU C++,
CUDA C++ and Triton kernels, ``torch.library.custom_op`` + fake + autograd, input checks.
The backend is chosen per call (:mod:`._backend`); force one with QWEN3_FAST_BACKEND or
:func:`set_backend`.
"""
from qwen3_fast.ops import reference
from qwen3_fast.ops._backend import BACKENDS, get_backend, set_backend, use_backend
from qwen3_fast.ops.add_rms_norm import add_rms_norm
from qwen3_fast.ops.attention import attention
from qwen3_fast.ops.cpu_grad_cache import cpu_grad_cache_stats, empty_cpu_grad_cache
from qwen3_fast.ops.flash_decode import flash_decode
from qwen3_fast.ops.kv_quantize import kv_dequantize, kv_quantize
from qwen3_fast.ops.linear import linear
from qwen3_fast.ops.linear_cross_entropy import linear_cross_entropy
from qwen3_fast.ops.linear_jsd import linear_jsd
from qwen3_fast.ops.linear_logprobs import linear_logprobs
from qwen3_fast.ops.grouped_gemm import grouped_gemm
from qwen3_fast.ops.moe import (expert_selection_counts, global_expert_frequencies,
                                global_load_balancing_loss, load_balancing_loss, moe_experts,
                                moe_route)
from qwen3_fast.ops.moe_permute import moe_permute, moe_unpermute
from qwen3_fast.ops.rms_norm import RMSNorm, rms_norm
from qwen3_fast.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_
from qwen3_fast.ops.rope import rope_cache
from qwen3_fast.ops.silu_and_mul import silu_and_mul

# Ops with compiled kernels and a backend choice ("moe" is the fused moe_experts block,
# "moe_permute" covers moe_permute/moe_unpermute). rope_cache and attention are
# reference-backed (plain torch) until their kernel issues land.
OPS = ("rms_norm", "add_rms_norm", "silu_and_mul", "qk_norm_rope", "kv_quantize",
       "flash_decode", "moe", "moe_permute", "grouped_gemm")

__all__ = ["BACKENDS", "OPS", "RMSNorm", "add_rms_norm", "attention", "cpu_grad_cache_stats",
           "empty_cpu_grad_cache", "flash_decode",
           "get_backend", "kv_dequantize", "kv_quantize",
           "linear", "linear_cross_entropy", "linear_jsd", "linear_logprobs",
           "expert_selection_counts", "global_expert_frequencies", "global_load_balancing_loss",
           "grouped_gemm", "moe_permute", "moe_unpermute",
           "load_balancing_loss", "moe_experts", "moe_route", "qk_norm_rope", "qk_norm_rope_",
           "reference", "rms_norm", "rope_cache", "set_backend", "silu_and_mul", "use_backend"]
