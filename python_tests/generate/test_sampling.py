"""Sampling primitives against straightforward full-vocabulary reference implementations on
fixed logits: penalties (HF repetition, OpenAI presence/frequency), temperature, top-k,
top-p, min-p, greedy; the draw follows the distribution; seeded generators reproduce."""
from __future__ import annotations

import pytest
import torch

from qwen3_fast.generate.params import SamplingParams
from qwen3_fast.generate.sampling import (BatchSampler, PenaltyState, apply_penalties, draw,
                                          filtered_candidates)


def ref_penalize(logits, seen_ids, gen_ids, rep, pres, freq):
    """One row: HF repetition penalty over seen ids, then presence/frequency over generated."""
    out = logits.clone()
    for t in set(seen_ids):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(gen_ids):
        out[t] -= pres + freq * gen_ids.count(t)
    return out


def ref_probs(logits, temperature, top_k, top_p, min_p):
    """One row, full vocabulary, written like the textbook definitions."""
    x = logits / temperature
    if top_k > 0:
        kth = torch.sort(x, descending=True).values[min(top_k, x.numel()) - 1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    p = torch.softmax(x, -1)
    order = torch.argsort(p, descending=True)
    mass_before = 0.0
    keep = torch.zeros_like(p, dtype=torch.bool)
    for i in order.tolist():
        if mass_before < top_p:
            keep[i] = True
        mass_before += p[i].item()
    p = p * keep
    p = p / p.sum()
    p = torch.where(p >= min_p * p.max(), p, torch.zeros_like(p))
    return p / p.sum()


def _rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    # (temperature, top_k, top_p, min_p): each filter alone, combined, and all off
    settings = [(1.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
                (0.6, 20, 0.95, 0.05), (1.0, 0, 1.0, 0.2)]
    return logits, settings


def test_filters_match_reference():
    logits, settings = _rows()
    t = torch.tensor([s[0] for s in settings])
    k = torch.tensor([s[1] for s in settings])
    p = torch.tensor([s[2] for s in settings])
    m = torch.tensor([s[3] for s in settings])
    probs, ids = filtered_candidates(logits, t, k, p, m, k_max=logits.shape[1])
    full = torch.zeros_like(logits).scatter(1, ids, probs)
    for r, (tr, kr, pr, mr) in enumerate(settings):
        want = ref_probs(logits[r], tr, kr, pr, mr)
        torch.testing.assert_close(full[r], want, rtol=1e-5, atol=1e-6)
    # the candidate shortcut (k_max = largest top-k) gives the same rows when all use top-k
    rows = [1, 3]
    probs2, ids2 = filtered_candidates(logits[rows], t[rows], k[rows], p[rows], m[rows], k_max=20)
    full2 = torch.zeros_like(logits[rows]).scatter(1, ids2, probs2)
    torch.testing.assert_close(full2, full[rows], rtol=1e-5, atol=1e-6)
    assert (full[1] > 0).sum() == 20 and (full[4] > 0).sum() < 300


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g) * 2
    prompts = [[1, 2, 3, 3], [], [7]]
    generated = [[4, 4, 9], [2, 2, 2], [7, 8, 7]]
    rep = torch.tensor([1.3, 1.0, 0.8])
    pres = torch.tensor([0.5, 1.5, 0.0])
    freq = torch.tensor([0.2, 0.0, -0.3])
    state = PenaltyState(3, 50, "cpu", need_counts=True, need_seen=True)
    state.add_prompts(prompts)
    for step in range(3):
        state.add_tokens(torch.tensor([generated[b][step] for b in range(3)]))
    got = apply_penalties(logits, state, rep, pres, freq)
    for b in range(3):
        want = ref_penalize(logits[b], prompts[b] + generated[b], generated[b],
                            rep[b].item(), pres[b].item(), freq[b].item())
        torch.testing.assert_close(got[b], want)


def test_draw_follows_distribution_and_seeds_reproduce():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(3)
    picks = draw(probs, [g] * probs.shape[0])
    freq = torch.bincount(picks, minlength=5).float() / picks.numel()
    assert (freq - probs[0]).abs().max() < 0.03
    assert freq[4] == 0
    a = draw(probs[:3], [torch.Generator().manual_seed(5)] * 3)
    b = draw(probs[:3], [torch.Generator().manual_seed(5)] * 3)
    assert torch.equal(a, b)


def test_batch_sampler_greedy_rows_and_seeds():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 64, generator=g)
    greedy = SamplingParams(temperature=0).resolved({})
    hot = SamplingParams(temperature=1.0, top_k=0, seed=11).resolved({})
    s1 = BatchSampler([greedy, hot, hot], [[1], [2], [3]], 64, "cpu")
    s2 = BatchSampler([greedy, hot, hot], [[1], [2], [3]], 64, "cpu")
    draws1 = torch.stack([s1.sample(logits) for _ in range(20)])
    draws2 = torch.stack([s2.sample(logits) for _ in range(20)])
    assert torch.equal(draws1, draws2)  # per-request generators: reproducible
    assert (draws1[:, 0] == logits[0].argmax()).all()  # temperature 0 is argmax
    assert len(set(draws1[:, 1].tolist())) > 1
    # padded vocabulary columns (lm_head wider than the tokenizer) are never chosen
    wide = torch.cat((logits, torch.full((3, 8), 100.0)), 1)
    assert (s1.sample(wide) < 64).all()


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=1.0), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(repetition_penalty=0.0),
                                                        "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(stop=[""]), "stop"), (dict(seed=1.5), "seed")])
def test_impossible_values_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
