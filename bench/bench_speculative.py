"""Self-speculative decoding (QuantSpec) against plain decoding, same model, one run.

Model: Qwen3-0.6B widths (hidden 1024, 16/8 heads, head_dim 128, intermediate 3072, vocab
151936) with 4 layers and RANDOM weights (init std 0.2, which makes the logits peaky; no
trained checkpoint exists yet, so the acceptance rate here says little about a real model's:
the end-to-end issue's trained tiny model is the one to quote acceptance from). Context:
the KV cache of every layer is filled with random keys and values of the given length
(written through ``cache.write``, quantized like any decode would) instead of a prefill,
because a 32K-token prefill takes many minutes on 2 cores; decode speed does not depend on
where the keys came from. Then 32 new tokens, greedy, batch 1.

With ``QWEN3_FAST_DEMO_DIR`` set to a finished ``qwen3-fast demo`` output directory, three
more cases use its TRAINED final teacher (``general_rl/model``; the default demo's is hidden 128, 3 layers, 4 query / 2 KV
heads of 32 dims, vocab 384) at contexts 2K, 8K and 32K - 64: the cache then
holds the model's own keys and values from a real prefill of the demo's long worked-problem
documents (one chunked prefill per context, copied into each round's fresh cache), and
decoding continues that text, so the acceptance rate is a trained model's. The demo trains
at <= 768 tokens (RoPE base 1e6 after S3), so long contexts are beyond its training length.

Implementations per context: ``plain-bf16`` (dense cache, flash_decode 16-bit),
``plain-int8`` (hierarchical cache read at 8 bits) and ``speculative-int8`` (gamma 4, draft
reads the 4-bit view, verify the 8-bit view, rollback). The summary prints the speculative
speedup over both plain variants and the acceptance rate.

    pytest bench/bench_speculative.py --benchmark-only -s
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from qwen3_fast.generate.engine import decode_step
from qwen3_fast.generate.params import SamplingParams
from qwen3_fast.generate.sampling import BatchSampler
from qwen3_fast.generate.speculative import QuantSpecConfig, speculative_step
from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM

NEW_TOKENS = 32
GAMMA = 4
SMOKE = dict(num_hidden_layers=1, vocab_size=4096)
CASES = {  # id: (config overrides on the 0.6B preset, context, new tokens)
    "cpu-0.6Bw-4L-ctx2048-b1": (dict(num_hidden_layers=4), 2048, NEW_TOKENS),
    "cpu-0.6Bw-4L-ctx8192-b1": (dict(num_hidden_layers=4), 8192, NEW_TOKENS),
    "cpu-0.6Bw-4L-ctx32768-b1": (dict(num_hidden_layers=4), 32768, NEW_TOKENS),
    "cpu-smoke-1-1024-ctx256-b1": (SMOKE, 256, 6),
}
DEMO_DIR = os.environ.get("QWEN3_FAST_DEMO_DIR")
if DEMO_DIR:
    for _ctx in (2048, 8192, 32768 - 64):
        CASES[f"cpu-demo-teacher-ctx{_ctx}-b1"] = (None, _ctx, NEW_TOKENS)
IMPLS = ["plain-bf16", "plain-int8", "speculative-int8"]
RESULTS: dict[tuple[str, str], dict] = {}
_MODELS: dict[str, Qwen3ForCausalLM] = {}


_PREFILLED: dict[str, tuple] = {}  # case -> (per-layer (k, v) of the context, next token)


def _demo_prefill(model, ctx: int) -> tuple:
    """The trained demo model's own keys/values over `ctx` tokens of the demo's long documents
    (a chunked dense-cache prefill), and the text's next token."""
    from qwen3_fast.tokenizer import Qwen3Tokenizer

    tok = Qwen3Tokenizer.from_pretrained(os.path.join(DEMO_DIR, "general_rl", "model"))
    ids: list[int] = []
    with open(os.path.join(DEMO_DIR, "data", "pretrain_long.jsonl"), encoding="utf-8") as f:
        for line in f:
            ids += tok.encode(json.loads(line)["text"] + "\n\n")
            if len(ids) > ctx:
                break
    if len(ids) <= ctx:
        ids = (ids * (ctx // max(len(ids), 1) + 2))
    cache = model.new_cache(1, ctx + 64, "dense")
    with torch.inference_mode():
        for s0 in range(0, ctx, 2048):
            model(torch.tensor([ids[s0:min(ctx, s0 + 2048)]]), cache=cache, logits_to_keep=1)
        kv = [(cache.k[layer, :, :, :ctx].clone(), cache.v[layer, :, :, :ctx].clone())
              for layer in range(model.config.num_hidden_layers)]
    return kv, ids[ctx]


def _model(case: str) -> Qwen3ForCausalLM:
    if case not in _MODELS and CASES[case][0] is None:  # the trained demo teacher
        _MODELS.clear()
        _PREFILLED.clear()
        path = os.path.join(DEMO_DIR, "general_rl", "model")
        _MODELS[case] = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        _PREFILLED[case] = _demo_prefill(_MODELS[case], CASES[case][1])
    if case not in _MODELS:
        overrides, ctx, _ = CASES[case]
        cfg = Qwen3Config.from_name("Qwen3-0.6B", initializer_range=0.2,
                                    max_position_embeddings=max(40960, ctx + 64), **overrides)
        torch.manual_seed(0)
        _MODELS.clear()  # one model alive at a time
        _MODELS[case] = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    return _MODELS[case]


def _filled_cache(model, kind: str, ctx: int, kv=None):
    cfg = model.config
    extra = {"max_speculative_tokens": GAMMA + 1} if kind == "hierarchical" else {}
    cache = model.new_cache(1, ctx + 64, kind, **extra)
    g = torch.Generator().manual_seed(1)
    cache.begin_step([ctx])
    if kv is not None:  # a trained model's own keys and values (real prefill)
        for layer, (k, v) in enumerate(kv):
            cache.write(layer, k, v)
        return cache
    for layer in range(cfg.num_hidden_layers):
        shape = (1, cfg.num_key_value_heads, ctx, cfg.head_dim)
        k = torch.randn(shape, generator=g).to(torch.bfloat16)
        v = torch.randn(shape, generator=g).to(torch.bfloat16)
        cache.write(layer, k, v)
    return cache


def _greedy_sampler(model):
    params = [SamplingParams(temperature=0.0).resolved({})]
    return BatchSampler(params, [[]], model.config.vocab_size, model.device)


@torch.inference_mode()
def _plain(model, cache, new_tokens: int, first: int = 1) -> dict:
    tok = torch.tensor([first])
    for _ in range(new_tokens):
        tok = decode_step(model, tok, cache).argmax(-1)
    return {"tokens": new_tokens}


@torch.inference_mode()
def _speculative(model, cache, new_tokens: int, first: int = 1) -> dict:
    sampler = _greedy_sampler(model)
    config = QuantSpecConfig(gamma=GAMMA, max_gamma=GAMMA)
    tok, made, accepted, steps = torch.tensor([first]), 0, 0, 0
    while made < new_tokens:
        out, n, _, _ = speculative_step(model, cache, tok, GAMMA, sampler, config)
        k = int(n[0])
        made, accepted, steps = made + k + 1, accepted + k, steps + 1
        tok = out[:, k]
    return {"tokens": made, "acceptance": accepted / (steps * GAMMA), "steps": steps}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_speculative(benchmark, case, impl):
    model = _model(case)
    _, ctx, new = CASES[case]
    kind = "dense" if impl == "plain-bf16" else "hierarchical"
    run = _speculative if impl.startswith("speculative") else _plain
    holder = {}

    kv, first = _PREFILLED.get(case, (None, 1))

    def setup():
        return (model, _filled_cache(model, kind, ctx, kv), new, first), {}

    def target(*args):
        holder.update(run(*args))

    benchmark.group = f"speculative-{case}"
    benchmark.extra_info.update(impl=impl, device="cpu", context=ctx)
    benchmark.pedantic(target, setup=setup, rounds=2, iterations=1)
    benchmark.extra_info.update(holder)
    assert holder["tokens"] >= new
    if benchmark.stats is None:  # --benchmark-disable (CI smoke): ran once, nothing timed
        return
    # per generated token, so speculative runs that overshoot the target count are fair
    RESULTS[(case, impl)] = {"seconds_per_token": benchmark.stats.stats.median / holder["tokens"],
                             **holder}


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if not RESULTS:
        return
    print("\nspeculative decoding (per generated token; 0.6Bw cases: random weights, so their "
          "acceptance is not a real model's; demo-teacher cases: the trained demo model)")
    print(f"{'case':<30}{'plain-bf16':>12}{'plain-int8':>12}{'spec-int8':>12}"
          f"{'vs int8':>9}{'vs bf16':>9}{'accept':>8}")
    for case in CASES:
        r = {impl: RESULTS.get((case, impl)) for impl in IMPLS}
        if not all(r.values()):
            continue
        t = {impl: v["seconds_per_token"] for impl, v in r.items()}
        print(f"{case:<30}{t['plain-bf16'] * 1e3:>10.1f}ms{t['plain-int8'] * 1e3:>10.1f}ms"
              f"{t['speculative-int8'] * 1e3:>10.1f}ms"
              f"{t['plain-int8'] / t['speculative-int8']:>8.2f}x"
              f"{t['plain-bf16'] / t['speculative-int8']:>8.2f}x"
              f"{r['speculative-int8']['acceptance']:>8.0%}")
