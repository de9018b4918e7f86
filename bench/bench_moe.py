"""MoE sparse block: qwen3_fast (fused ``moe_experts`` op) vs the reference vs HF's eager
``Qwen3MoeSparseMoeBlock`` (transformers 4.x expert loop), same weights, one run.

Shapes: the Qwen3-30B-A3B layer (H 2048, E 128, top-8, I 768; ``hidden`` id 2048) at
1, 16 and 512 tokens, plus a small layer (H 1024, E 16, top-4, I 256; id 1024) that the CI
smoke filter ``-1-1024-`` selects. bf16 weights and activations, router included (the
block's ``gate`` linear), forward and forward+backward (gradients for x and every weight).
The GPU part compares the grouped GEMMs (ours: CUTLASS sm_90a, CUDA tiled kernel, Triton)
against ``torch._grouped_mm`` (when present) and a per-expert cuBLAS loop (impl
``reference``: the summary's "vs ref" column is the speedup over that loop), both expert
GEMMs of the layer at 16, 512 and 4096 tokens; extra_info has TFLOP/s and, on H100/H200,
the fraction of the 989 TFLOP/s dense bf16 peak.

    pytest bench/bench_moe.py --benchmark-only   # CPU: 10+ minutes on 2 cores (HF and the
                                                 # reference take seconds per 512-token step)
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.model.config import Qwen3Config
from qwen3_fast.model.moe import Qwen3SparseMoeBlock
from qwen3_fast.ops.grouped_gemm import sm90_kernel_built

from _ops_common import _NO_CUDA_KERNELS, _NO_GPU, _NO_TRITON, MODES, hf_available

# hidden -> (experts, top_k, moe_intermediate)
LAYERS = {2048: (128, 8, 768), 1024: (16, 4, 256)}
TOKENS = [1, 16, 512]
IMPLS = [pytest.param("qwen3_fast", id="cpu-qwen3_fast"),
         pytest.param("reference", id="cpu-reference"),
         pytest.param("hf_eager", id="cpu-hf_eager",
                      marks=pytest.mark.skipif(not hf_available(), reason="no transformers"))]

_blocks: dict = {}


def _config(hidden: int) -> Qwen3Config:
    e, k, inter = LAYERS[hidden]
    return Qwen3Config(vocab_size=32, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=128, model_type="qwen3_moe", num_experts=e,
                       num_experts_per_tok=k, moe_intermediate_size=inter, norm_topk_prob=True)


def blocks(hidden: int):
    """(our block, HF block) in bf16; HF's per-expert Linear weights are views of ours."""
    if hidden in _blocks:
        return _blocks[hidden]
    _blocks.clear()  # one layer shape in memory at a time
    torch.manual_seed(0)
    cfg = _config(hidden)
    e, k, inter = LAYERS[hidden]
    ours = Qwen3SparseMoeBlock(cfg).to(torch.bfloat16)
    with torch.no_grad():
        ours.gate.weight.normal_(0, 0.02)
        ours.experts.gate_up_proj.normal_(0, 0.02)
        ours.experts.down_proj.normal_(0, 0.02)
    hf = None
    if hf_available():
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        hcfg = transformers.Qwen3MoeConfig(hidden_size=hidden, num_experts=e,
                                           num_experts_per_tok=k, moe_intermediate_size=inter,
                                           norm_topk_prob=True)
        with torch.device("meta"):
            hf = Qwen3MoeSparseMoeBlock(hcfg)
        gu, dn = ours.experts.gate_up_proj.detach(), ours.experts.down_proj.detach()
        hf.gate.weight = torch.nn.Parameter(ours.gate.weight.detach().clone())
        if hasattr(hf.experts, "gate_up_proj"):  # transformers 5: stacked, our layout
            hf.experts.gate_up_proj = torch.nn.Parameter(gu.clone())
            hf.experts.down_proj = torch.nn.Parameter(dn.clone())
        else:  # transformers 4: one MLP per expert
            for i, mlp in enumerate(hf.experts):
                mlp.gate_proj.weight = torch.nn.Parameter(gu[i, :inter])
                mlp.up_proj.weight = torch.nn.Parameter(gu[i, inter:])
                mlp.down_proj.weight = torch.nn.Parameter(dn[i])
    _blocks[hidden] = (ours, hf)
    return ours, hf


def _run(block, x, backend=None):
    # transformers 4's block returns (hidden, router_logits), 5's the hidden states alone
    with ops.use_backend(backend) if backend else contextlib.nullcontext():
        out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", sorted(LAYERS))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_block(benchmark, impl, tokens, hidden, mode):
    if hidden == 1024 and tokens != 1:
        pytest.skip("the small layer is the CI smoke shape (1 token) only")
    ours, hf = blocks(hidden)
    block = hf if impl == "hf_eager" else ours
    backend = "reference" if impl == "reference" else None
    e, k, inter = LAYERS[hidden]
    torch.manual_seed(1)
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16)
    params = list(block.parameters())
    # weights read once (only the experts the tokens chose, at most all of them)
    hit = min(e, tokens * k)
    nbytes = 2 * (hit * 3 * inter * hidden + 2 * tokens * hidden + e * hidden)
    benchmark.group = f"cpu-moe-{mode}-bf16-T{tokens}-H{hidden}-E{e}-k{k}-I{inter}"
    benchmark.extra_info.update(impl=impl, device="cpu", bytes=nbytes * (3 if mode != "fwd" else 1))
    if mode == "fwd":
        with torch.no_grad():
            benchmark.pedantic(lambda: _run(block, x, backend), rounds=5,
                               warmup_rounds=1, iterations=1)
        return
    # Four batches in turn, as a training loop never sees the same tokens twice in a row: the
    # experts hit change every step (our recycled gradient pages must move, HF's per-expert
    # gradients come and go). zero_grad(set_to_none) before each step, like the optimizers.
    xs = [x] + [torch.randn_like(x) for _ in range(3)]
    xs = [t.clone().requires_grad_() for t in xs]
    dy = torch.randn_like(x)
    turn = itertools.count()

    def step():
        for p in params:
            p.grad = None
        xg = xs[next(turn) % len(xs)]
        xg.grad = None
        _run(block, xg, backend).backward(dy)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    for p in params:
        p.grad = None


# ------------------------------------------------------------------ GPU grouped GEMM
_NO_SM90 = pytest.mark.skipif(
    not (torch.cuda.is_available() and sm90_kernel_built()
         and torch.cuda.get_device_capability() == (9, 0)),
    reason="needs a compute capability 9.0 GPU and the sm_90a CUTLASS kernel in the build")
GPU_IMPLS = [
    pytest.param("cutlass", id="cuda-cutlass", marks=[pytest.mark.cuda, _NO_SM90]),
    pytest.param("cuda", id="cuda-cuda", marks=[pytest.mark.cuda, _NO_CUDA_KERNELS]),
    pytest.param("triton", id="cuda-triton", marks=[pytest.mark.cuda, _NO_TRITON]),
    pytest.param("torch_grouped_mm", id="cuda-torch_grouped_mm", marks=[pytest.mark.cuda, _NO_GPU]),
    pytest.param("reference", id="cuda-reference", marks=[pytest.mark.cuda, _NO_GPU]),
]
# Dense bf16/fp16 tensor-core peak of an H100/H200 SXM (989 TFLOP/s), for the fraction
# reported in extra_info; other GPUs get their own fraction only if added here.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
# The layer's two expert GEMMs (forward, trans_b): gate_up x [T*8, H] @ W[E, 2I, H]^T and
# down act [T*8, I] @ W[E, H, I]^T.
GEMMS = {"gate_up": (2 * LAYERS[2048][2], 2048), "down": (2048, LAYERS[2048][2])}


@pytest.mark.parametrize("gemm", sorted(GEMMS))
@pytest.mark.parametrize("tokens", [16, 512, 4096])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_grouped_gemm_gpu(benchmark, monkeypatch, impl, tokens, gemm):
    """The 30B-A3B expert GEMMs: a [T*8, K] x b [128, N, K]^T, bf16 (N, K from GEMMS).
    ``cutlass``: CUTLASS sm_90a; ``cuda``: the tiled kernel; ``reference``: a per-expert
    cuBLAS loop (torch.matmul per expert, host-side bounds); ``torch_grouped_mm``: torch's
    own grouped GEMM."""
    e, k_top, _ = LAYERS[2048]
    n, k = GEMMS[gemm]
    torch.manual_seed(0)
    ids = torch.randint(0, e, (tokens * k_top,), device="cuda")
    counts = torch.bincount(ids, minlength=e)
    offsets = torch.zeros(e + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = counts.cumsum(0)
    a = torch.randn(tokens * k_top, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    if impl in ("cuda", "triton", "cutlass"):
        # "cuda" is the tiled kernel here whatever QWEN3_FAST_GROUPED_GEMM says
        monkeypatch.setenv("QWEN3_FAST_GROUPED_GEMM", "tiled")

        def fn():
            ops.grouped_gemm(a, b, offsets, trans_b=True, backend=impl)
    elif impl == "torch_grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch._grouped_mm is not in this torch")
        offs32 = offsets[1:].to(torch.int32)  # int32 cumulative group ends
        bt = b.transpose(1, 2)  # [E, K, N] view with column-major inner matrices

        def fn():
            torch._grouped_mm(a, bt, offs=offs32)
    else:
        bounds = offsets.tolist()

        def fn():
            c = torch.empty(a.shape[0], n, device="cuda", dtype=a.dtype)
            for i in range(e):
                if bounds[i + 1] > bounds[i]:
                    torch.matmul(a[bounds[i]:bounds[i + 1]], b[i].t(), out=c[bounds[i]:bounds[i + 1]])

    def timed():
        fn()
        torch.cuda.synchronize()

    flops = 2 * a.shape[0] * n * k
    benchmark.group = f"cuda-grouped_gemm-{gemm}-bf16-T{tokens}-E{e}-N{n}-K{k}"
    benchmark.extra_info.update(impl=impl, device="cuda", flops=flops,
                                bytes=2 * (a.numel() + b.numel() + a.shape[0] * n))
    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    tflops = flops / benchmark.stats.stats.median / 1e12
    name = torch.cuda.get_device_name()
    peak = next((v for key, v in PEAK_TFLOPS.items() if key in name), None)
    benchmark.extra_info.update(tflops=round(tflops, 2),
                                fraction_of_peak=round(tflops / peak, 4) if peak else None)
