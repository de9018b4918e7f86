"""Prefill benchmark: one forward over 512 tokens of a Qwen3-0.6B-shaped model, bf16, CPU.

qwen3_fast's Qwen3ForCausalLM against transformers' Qwen3ForCausalLM on the same random
weights (transformers builds and saves the checkpoint; ours loads it), in one run, group
"prefill-0.6B-512". The model has the 0.6B widths (hidden 1024, 16/8 heads, head_dim 128,
intermediate 3072, vocab 151936, tied embeddings) but only 4 of its 28 layers by default so
that a round stays within seconds on a 2-core CPU; set QWEN3_FAST_BENCH_LAYERS=28 for the full
depth. Note that with 4 layers the LM head ([512, 1024] x [1024, 151936]) is a large share
of the time, the same matmul on both sides.

    pytest bench/bench_model_prefill.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen3_fast.model import Qwen3ForCausalLM  # noqa: E402

TOKENS = 512
LAYERS = int(os.environ.get("QWEN3_FAST_BENCH_LAYERS", "4"))
GROUP = "prefill-0.6B-512"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model, input_ids [1, 512]) sharing one bf16 checkpoint."""
    kw = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
              num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
              tie_word_embeddings=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    else:
        kw["rope_theta"] = 1e6
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("qwen3-0.6b-shaped")
    hf.save_pretrained(path)
    ours = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 151669, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    return hf, ours, ids


def _record(benchmark, impl: str, model) -> None:
    # bytes: every weight read once (the floor for one forward); flops: matmuls only
    weights = {id(p): p for p in model.parameters()}.values()
    nbytes = sum(p.numel() * p.element_size() for p in weights)
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and "norm" not in n)  # lm_head (tied) counted once
    attn = 4 * LAYERS * 16 * 128 * TOKENS * TOKENS // 2  # causal QK^T and PV
    benchmark.extra_info.update(impl=impl, device="cpu", bytes=nbytes, layers=LAYERS,
                                flops=2 * matmul_params * TOKENS + attn)


def _prefill(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.benchmark(group=GROUP)
def test_prefill_qwen3_fast(benchmark, models):
    _, ours, ids = models
    _record(benchmark, "qwen3_fast", ours)
    logits = benchmark.pedantic(_prefill, args=(ours, ids), rounds=3, iterations=1,
                                warmup_rounds=1)
    assert logits.shape == (1, TOKENS, 151936)


@pytest.mark.benchmark(group=GROUP)
def test_prefill_transformers(benchmark, models):
    hf, ours, ids = models
    _record(benchmark, "hf_eager", hf)  # conftest's HF-baseline key; attention is HF's default (sdpa)
    logits = benchmark.pedantic(_prefill, args=(hf, ids), rounds=3, iterations=1,
                                warmup_rounds=1)
    mine = _prefill(ours, ids)
    err = ((mine.float() - logits.float()).abs().max() / logits.float().abs().max()).item()
    # bf16 with random weights: HF's own sdpa and eager paths differ by ~1% of the max logit
    # here, and the gap grows with the vocabulary; this only catches gross errors.
    assert err < 1e-1, f"our logits differ from transformers by {err:.3g} (relative)"
