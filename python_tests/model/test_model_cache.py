"""The model's KV-cache path: prefill (SDPA, writes the cache) and decode (flash_decode)
through one forward.

- greedy decoding with the dense cache gives the tokens of full-forward recomputation;
- ragged (right-padded) batched prefill + decode equals each sequence alone;
- verify / chunked steps (S > 1 on a non-empty cache) equal the full forward;
- the 8-bit hierarchical cache moves the perplexity of a tiny random bf16 model on random
  text by < 1% from the bf16 dense cache (the figure is printed with -s).

    pytest python_tests/model/test_model_cache.py -s     # ~20 s on 2 CPU cores
"""
from __future__ import annotations

import math

import pytest
import torch

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
