"""The model's KV-cache path: prefill (SDPA, writes the cache) and decode (flash_decode)
through one forward.

- greedy decoding with the dense cache gives the tokens of full-forward recomputation;
- ragged (right-padded) batched prefill + decode equals each sequence alone;
- verify / chunked steps (S > 1 on a non-empty cache) equal the full forward;
- MoE models: greedy with the cache equals full recomputation;
- torch.compile of a decode step through the cache path (fullgraph for write + attention);
- the 8-bit hierarchical cache moves the perplexity of a tiny random bf16 model on random
  text by < 1% from the bf16 dense cache (the figure is printed with -s).

    pytest python_tests/model/test_model_cache.py -s     # ~20 s on 2 CPU cores
"""
from __future__ import annotations

import math

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM


def tiny(dtype=torch.float32, seed=0, layers=2, init=0.02, **kw):
    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=4096, rope_theta=1e6,
                      initializer_range=init, **kw)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def greedy_full(model, ids, steps):
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), 1)
    return ids


@torch.no_grad()
def greedy_cached(model, ids, steps, cache, precision=None):
    logits = model(ids, cache=cache, precision=precision).logits[:, -1]
    out = ids
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out = torch.cat((out, nxt), 1)
        logits = model(nxt, cache=cache, precision=precision).logits[:, -1]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_dense_cache_equals_full_recompute(dtype):
    model = tiny(dtype, init=0.2)  # peaky logits so greedy choices are not near ties
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    want = greedy_full(model, ids, 24)
    got = greedy_cached(model, ids, 24, model.new_cache(2, 64))
    assert torch.equal(got, want)


def test_cached_logits_match_full_forward_and_verify_steps():
    model = tiny(torch.float32)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    full = model(ids).logits
    for kind, prec, tol in (("dense", 16, 1e-5), ("hierarchical", 8, 5e-2)):
        cache = model.new_cache(2, 64, kind, group_size=8)
        parts = [model(ids[:, :10], cache=cache, precision=prec).logits]
        parts.append(model(ids[:, 10:11], cache=cache, precision=prec).logits)  # decode
        parts.append(model(ids[:, 11:16], cache=cache, precision=prec).logits)  # verify, n=5
        parts.append(model(ids[:, 16:40], cache=cache, precision=prec).logits)  # chunked prefill
        got = torch.cat(parts, 1)
        err = (got - full).abs().max().item() / full.abs().max().item()
        assert err <= tol, f"{kind}: {err}"


def test_rollback_then_decode_equals_never_drafted():
    model = tiny(torch.float32)
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(5))
    a = model.new_cache(1, 64, "hierarchical", group_size=8)
    b = model.new_cache(1, 64, "hierarchical", group_size=8)
    model(ids[:, :20], cache=a)
    model(ids[:, :20], cache=b)
    model(ids[:, 20:24], cache=a)  # a draft of 4 tokens, all rejected
    a.rollback(4)
    la = model(ids[:, 24:25], cache=a).logits
    lb = model(ids[:, 24:25], cache=b).logits
    assert torch.equal(la, lb)


def test_moe_greedy_cache_equals_full_recompute():
    # MoE layers (router + experts) between cached attention: dense cache tokens equal full
    # recomputation; the 8-bit cache's logits stay close to it
    model = tiny(torch.float32, init=0.2, model_type="qwen3_moe", num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=64)
    assert model.config.is_moe
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(8))
    want = greedy_full(model, ids, 6)
    assert torch.equal(greedy_cached(model, ids, 6, model.new_cache(2, 32)), want)
    cache = model.new_cache(2, 32, "hierarchical", group_size=2)
    with torch.no_grad():
        got = torch.cat([model(want[:, :9], cache=cache, precision=8).logits] +
                        [model(want[:, i:i + 1], cache=cache, precision=8).logits
                         for i in range(9, 15)], 1)
        full = model(want).logits
    assert cache.quantized_lengths() == [12, 12]  # n_quant(15) with G = 2: codes are read
    assert (got - full).abs().max() <= 5e-2 * full.abs().max()


def test_compile_decode_step(kind="hierarchical", precision=8):
    """torch.compile of one decode step through the cache path. The whole model step
    compiles (aot_eager: dynamo + fake tensors, no C++ codegen, to stay fast) but not with
    fullgraph=True: the model's position checks (`int(positions.max())` for the rope table,
    `positions.min() < 0`) are data-dependent .item() calls that break the graph. The cache
    path itself (write + flash_decode) compiles with fullgraph=True. Dynamo guards on the
    cache's host-side lengths (Python ints), so every step recompiles: compiling a decode
    loop needs lengths as tensors end to end (the engine's concern)."""
    model = tiny(torch.float32)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(9))
    a = model.new_cache(2, 48, kind, group_size=4)
    b = model.new_cache(2, 48, kind, group_size=4)
    step = torch.compile(lambda x, c: model(x, cache=c, precision=precision).logits,
                         backend="aot_eager")
    with torch.no_grad():
        model(ids, cache=a, precision=precision)
        model(ids, cache=b, precision=precision)
        for i in range(1):
            nxt = ids[:, i:i + 1]
            torch.testing.assert_close(step(nxt, b),
                                       model(nxt, cache=a, precision=precision).logits,
                                       rtol=1e-5, atol=1e-5)
    # fullgraph over the cache path of one layer
    hkv, d = model.config.num_key_value_heads, model.config.head_dim
    k, v = torch.randn(2, hkv, 1, d), torch.randn(2, hkv, 1, d)
    q = torch.randn(2, model.config.num_attention_heads, 1, d)

    def attend(cache, q, k, v):
        cache.write(0, k, v)
        return ops.flash_decode(q, cache, 0, precision)

    for c in (a, b):
        c.begin_step(1)
    got = torch.compile(attend, fullgraph=True, backend="aot_eager")(b, q, k, v)
    torch.testing.assert_close(got, attend(a, q, k, v), rtol=0, atol=0)
    for name, t in a.live_state().items():
        assert t == b.live_state()[name] if name in ("length", "n_quant") else \
            all(torch.equal(x, y) for x, y in zip(t, b.live_state()[name]))


def test_ragged_right_padded_prefill_then_decode():
    model = tiny(torch.float32)
    g = torch.Generator().manual_seed(6)
    lens = [7, 3, 12]
    seqs = [torch.randint(0, 512, (n,), generator=g) for n in lens]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, sq in enumerate(seqs):
        ids[i, :len(sq)] = sq
        mask[i, :len(sq)] = 1
    cache = model.new_cache(3, 32)
    out = model(ids, attention_mask=mask, cache=cache).logits
    nxt = torch.randint(0, 512, (3, 1), generator=g)
    dec = model(nxt, cache=cache).logits[:, -1]
    for i, sq in enumerate(seqs):
        full = model(torch.cat((sq, nxt[i]))[None]).logits[0]
        torch.testing.assert_close(out[i, len(sq) - 1], full[len(sq) - 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dec[i], full[-1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask.flip(1), cache=model.new_cache(3, 32))


def test_cache_checks():
    model = tiny(torch.float32)
    ids = torch.randint(0, 512, (2, 4))
    with pytest.raises(ValueError, match="cache has"):
        model(ids, cache=model.new_cache(3, 16))
    with pytest.raises(TypeError, match="dtype"):
        model(ids, cache=tiny(torch.bfloat16).new_cache(2, 16))
    with pytest.raises(ValueError, match="precision"):
        model(ids, cache=model.new_cache(2, 16), precision=8)


@torch.no_grad()
def perplexity(model, ids, cache, precision, chunk=16, prefill=64):
    """Teacher-forced perplexity through the cache: a prefill, then steps of `chunk` tokens
    (flash_decode's verify path), so most keys are read back from the cache."""
    logits = [model(ids[:, :prefill], cache=cache, precision=precision).logits]
    for s in range(prefill, ids.shape[1], chunk):
        logits.append(model(ids[:, s:s + chunk], cache=cache, precision=precision).logits)
    logits = torch.cat(logits, 1)[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_8bit_cache_perplexity_within_1_percent():
    model = tiny(torch.bfloat16, layers=4, init=0.1)
    ids = torch.randint(0, 512, (2, 640), generator=torch.Generator().manual_seed(7))
    ppl = {"bf16": perplexity(model, ids, model.new_cache(2, 640), 16)}
    for bits in (8, 4):
        ppl[f"{bits}-bit"] = perplexity(model, ids, model.new_cache(2, 640, "hierarchical", 32), bits)
    rel8 = abs(ppl["8-bit"] / ppl["bf16"] - 1)
    rel4 = abs(ppl["4-bit"] / ppl["bf16"] - 1)
    print(f"\nperplexity (4 layers, vocab 512, 640 random tokens, G=32): bf16 {ppl['bf16']:.3f}, "
          f"8-bit {ppl['8-bit']:.3f} ({100 * rel8:.3f}%), 4-bit {ppl['4-bit']:.3f} ({100 * rel4:.3f}%)")
    assert rel8 < 0.01


def test_rope_tables_grow_geometrically():
    # decoding one position past the table per step must not rebuild it every step
    inner = tiny().model
    inner.config.max_position_embeddings = 40960
    cos, _ = inner.rope_tables(4000, torch.device("cpu"))
    assert cos.shape[0] == 4096  # the first table covers 4096 positions
    cos2, sin2 = inner.rope_tables(4097, torch.device("cpu"))
    assert cos2.shape[0] == 8192  # doubled, not grown by one
    assert inner.rope_tables(8192, torch.device("cpu"))[0] is cos2  # reused up to its size
    assert inner.rope_tables(40000, torch.device("cpu"))[0].shape[0] == 40000  # a jump: exact
    assert inner.rope_tables(40001, torch.device("cpu"))[0].shape[0] == 40960  # capped double
    assert inner.rope_tables(50000, torch.device("cpu"))[0].shape[0] == 50000  # beyond: exact
    ref_cos, ref_sin = inner.rope_tables(8192, torch.device("cpu"))
    assert torch.equal(ref_cos[:8192], cos2) and torch.equal(ref_sin[:8192], sin2)
