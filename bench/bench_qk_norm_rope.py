"""qk_norm_rope: qwen3_fast (fused C++ CPU kernel) vs the reference vs the unfused HF path, bf16.

HF path: ``Qwen3RMSNorm`` on q and on k (as ``Qwen3Attention`` applies them, then the
transpose to [B, H, S, D]) and ``apply_rotary_pos_emb`` with cos/sin [B, S, D] in the
activation dtype, as ``Qwen3RotaryEmbedding`` returns them. HF builds cos/sin once per
model forward and shares them across layers, so that gather is not timed (it would only
favour the fused op). Shape: Qwen3-4B/8B attention (Hq/Hkv 32/8, D 128), T = 4096 tokens,
positions 0..T-1 of the YaRN-4 table (131072 rows).

Run: ``pytest bench/bench_qk_norm_rope.py --benchmark-only``. Bytes counted (E = bytes of
q plus k in bf16): forward reads q, k and writes q_out, k_out (2E) plus the gathered cos/sin
rows (2 * T * D * 4); backward reads dq_out, dk_out, q, k and writes dq, dk (3E) plus
cos/sin again. Weight-sized and rstd terms are ignored.
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from _ops_common import DEVICE_IMPLS, run_bench

TOKENS, HQ, HKV, D = 4096, 32, 8, 128
EPS = 1e-6
YARN = {"head_dim": D, "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 32768}}
_TABLES: dict = {}


def _tables(device: str):
    if device not in _TABLES:
        _TABLES[device] = ops.rope_cache(YARN, 131072, device=device)
    return _TABLES[device]


def make_impl(impl: str, device: str, positions: torch.Tensor, dtype: torch.dtype):
    cos, sin = _tables(device)
    if impl in ("qwen3_fast", "cuda", "triton"):
        return lambda q, k, qw, kw: ops.qk_norm_rope(q, k, qw, kw, cos, sin, positions, EPS)
    if impl == "reference":
        return lambda q, k, qw, kw: reference.qk_norm_rope(q, k, qw, kw, cos, sin, positions, EPS)
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    q_norm = Qwen3RMSNorm(D, eps=EPS).to(device)
    k_norm = Qwen3RMSNorm(D, eps=EPS).to(device)
    cos_hf = cos[positions].to(dtype)  # [B, S, D], built once per model forward by HF
    sin_hf = sin[positions].to(dtype)

    def hf(q, k, qw, kw):
        q_norm.weight, k_norm.weight = qw, kw  # the benchmark's leaves (Parameters)
        qn = q_norm(q).transpose(1, 2)  # [B, Hq, S, D]
        kn = k_norm(k).transpose(1, 2)
        return apply_rotary_pos_emb(qn, kn, cos_hf, sin_hf)

    return hf


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_qk_norm_rope(benchmark, device, impl, mode):
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    dtype = torch.bfloat16
    q = torch.randn(1, TOKENS, HQ, D, dtype=dtype, device=device, requires_grad=grad)
    k = torch.randn(1, TOKENS, HKV, D, dtype=dtype, device=device, requires_grad=grad)
    qw = torch.nn.Parameter((1 + 0.1 * torch.randn(D, device=device)).to(dtype), requires_grad=grad)
    kw = torch.nn.Parameter((1 + 0.1 * torch.randn(D, device=device)).to(dtype), requires_grad=grad)
    positions = torch.arange(TOKENS, device=device)[None]
    e = TOKENS * (HQ + HKV) * D * 2
    cs = 2 * TOKENS * D * 4
    run_bench(benchmark, fn=make_impl(impl, device, positions, dtype), inputs=(q, k, qw, kw),
              mode=mode, nbytes_fwd=2 * e + cs, nbytes_bwd=3 * e + cs, impl=impl, device=device,
              group=f"qk_norm_rope-{mode}-bf16-T{TOKENS}-{HQ}/{HKV}-D{D}")
