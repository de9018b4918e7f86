"""Speculative acceptance rules, gamma control and config checks (generate/speculative.py)."""
from __future__ import annotations

import pytest
import torch

from qwen3_fast.generate.speculative import (GammaController, QuantSpecConfig, expected_tokens,
                                             greedy_accept, rejection_accept, speedup_estimate)

# Upper 0.1% points of the chi-square distribution (significance level 0.001), by degrees of
# freedom; from the standard table.
CHI2_CRIT_001 = {5: 20.515}


def test_greedy_accept_longest_prefix_and_next_token():
    draft = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 2, 3], [9, 9, 9]])
    target = torch.tensor([[5, 6, 7, 8],     # all accepted: bonus 8
                           [5, 0, 7, 8],     # mismatch at 1: emit 0
                           [4, 2, 3, 1],     # mismatch at 0 (later matches do not count)
                           [9, 9, 1, 2]])
    n, nxt = greedy_accept(draft, target)
    assert n.tolist() == [3, 1, 0, 2]
    assert nxt.tolist() == [8, 0, 4, 1]


def test_greedy_accept_checks_shapes():
    with pytest.raises(ValueError, match="target_tokens"):
        greedy_accept(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="draft_tokens"):
        greedy_accept(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_emits_the_target_distribution():
    # V = 6, gamma = 3, target and draft distributions that differ per position (the target
    # does not depend on the prefix, so the token emitted at position j, given the row got
    # that far, must be distributed as p_j). 200k rows in one batched call, fixed seed,
    # chi-square test at significance 0.001 per position.
    torch.manual_seed(1234)
    v, g, rows = 6, 3, 200_000
    p = torch.softmax(torch.randn(g + 1, v) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(g, v) * 1.5, dim=-1)
    draft = torch.multinomial(q, rows, replacement=True).t().contiguous()  # [rows, g]
    n, nxt = rejection_accept(draft, q.expand(rows, g, v), p.expand(rows, g + 1, v))
    # acceptance matches theory: P(accept x_i) = sum_x min(p_i, q_i)
    accept_prob = torch.minimum(p[:g], q).sum(-1)
    reached = torch.stack([(n >= i).float().mean() for i in range(g + 1)])
    expected_reach = torch.cat([torch.ones(1), accept_prob.cumprod(0)])
    torch.testing.assert_close(reached, expected_reach, atol=5e-3, rtol=0)
    for j in range(g + 1):
        at_j = n >= j
        emitted = torch.where(n[at_j] == j, nxt[at_j], draft[at_j][:, j] if j < g else nxt[at_j])
        counts = torch.bincount(emitted, minlength=v).double()
        stat = _chi2(counts, p[j].double())
        assert stat < CHI2_CRIT_001[v - 1], (j, stat, counts / counts.sum(), p[j])
        # and it is not the draft's distribution (the test can tell them apart)
        if j < g:
            assert _chi2(counts, q[j].double()) > CHI2_CRIT_001[v - 1]


def test_rejection_sampling_identical_distributions_accept_everything():
    torch.manual_seed(0)
    v, g, rows = 10, 4, 1000
    p = torch.softmax(torch.randn(rows, g + 1, v), dim=-1)
    draft = torch.multinomial(p[:, :g].reshape(-1, v), 1).view(rows, g)
    n, _ = rejection_accept(draft, p[:, :g], p)
    assert torch.all(n == g)


def test_rejection_sampling_seeded_generators_reproduce():
    v, g, rows = 7, 2, 4
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(rows, g + 1, v), dim=-1)
    q = torch.softmax(torch.randn(rows, g, v), dim=-1)
    draft = torch.multinomial(q.reshape(-1, v), 1).view(rows, g)
    runs = []
    for _ in range(2):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(rows)]
        runs.append(rejection_accept(draft, q, p, gens))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_rejection_sampling_checks_shapes():
    d = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_accept(d, torch.rand(2, 2, 5), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="target_probs"):
        rejection_accept(d, torch.rand(2, 3, 5), torch.rand(2, 3, 5))


def test_expected_tokens_and_speedup():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    # free draft, verify as cheap as a plain step: speedup = expected tokens
    assert speedup_estimate(0.5, 2, 0.0, 1.0, 1.0) == pytest.approx(1.75)


def test_gamma_controller_follows_acceptance():
    hi = GammaController(max_gamma=8)
    lo = GammaController(max_gamma=8)
    for _ in range(10):
        hi.update(drafted=40, accepted=38, draft_seconds=0.4, verify_seconds=1.0, gamma=4)
        lo.update(drafted=40, accepted=8, draft_seconds=0.4, verify_seconds=1.0, gamma=4)
    assert hi.gamma > lo.gamma >= 1
    assert hi.gamma <= 8


def test_gamma_controller_falls_back_to_plain_steps_and_probes():
    """Costs like this CPU's (draft 0.9x a plain step, verify 2.7x): no gamma beats plain
    decoding even at full acceptance, so "auto" decodes plainly, probing every 16 steps."""
    ctrl = GammaController(max_gamma=8, probe_every=16)
    assert ctrl.update_plain(1.0) == 4  # before any speculative measurement: keep gamma
    assert ctrl.update(drafted=4, accepted=4, draft_seconds=3.6, verify_seconds=2.7, gamma=4) == 0
    answers = [ctrl.update_plain(1.0) for _ in range(16)]
    assert answers[:15] == [0] * 15 and answers[15] == ctrl.best >= 1  # the probe
    # a cheap draft pays: speculation stays on
    good = GammaController(max_gamma=8)
    good.update_plain(1.0)
    assert good.update(drafted=4, accepted=4, draft_seconds=1.2, verify_seconds=1.2, gamma=4) >= 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=0), "gamma"), (dict(gamma="fast"), "gamma"), (dict(gamma=9, max_gamma=8), "max_gamma"),
    (dict(draft_kv_bits=2), "draft_kv_bits"), (dict(draft_weight_bits=8), "draft_weight_bits"),
    (dict(group_size=0), "group_size"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpecConfig(**kwargs)


# --------------------------------------------------------------------------- model level
def _tiny_model(moe: bool = False, seed: int = 0):
    from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM

    extra = (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64) if moe else {})
    cfg = Qwen3Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=512, initializer_range=0.1, **extra)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def _sampler(batch: int, vocab: int, temperature: float = 0.0, seed=None):
    from qwen3_fast.generate.params import SamplingParams
    from qwen3_fast.generate.sampling import BatchSampler

    params = [SamplingParams(temperature=temperature, seed=None if seed is None else seed + i)
              .resolved({}) for i in range(batch)]
    return BatchSampler(params, [[]] * batch, vocab, torch.device("cpu"))


def _prefill(model, cache, prompts):
    from qwen3_fast.generate.engine import prefill

    return prefill(model, prompts, cache).argmax(-1)


@torch.no_grad()
def _plain_greedy(model, prompts, new_tokens, group_size):
    cache = model.new_cache(len(prompts), 256, kind="hierarchical", group_size=group_size)
    tok = _prefill(model, cache, prompts)
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = model(tok.view(-1, 1), cache=cache, precision=8).logits[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("draft_weight_bits", [16, 4])
def test_greedy_speculative_equals_plain_greedy(moe, draft_weight_bits):
    from qwen3_fast.generate.speculative import speculative_step
    from qwen3_fast.model.quant import attach_draft_weights

    if moe and draft_weight_bits == 4:
        pytest.skip("int4 draft weights cover dense MLPs only (attach_draft_weights raises)")
    model = _tiny_model(moe)
    if draft_weight_bits == 4:
        attach_draft_weights(model, group_size=32)
    g = 8  # small groups: the 60 new tokens cross many group boundaries
    torch.manual_seed(3)
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 17, 1, 33)]
    new = 60
    expected, _ = _plain_greedy(model, prompts, new, g)
    config = QuantSpecConfig(gamma=3, draft_weight_bits=draft_weight_bits, group_size=g)
    cache = model.new_cache(len(prompts), 256, kind="hierarchical", group_size=g)
    sampler = _sampler(len(prompts), 128)
    with torch.no_grad():
        pending = _prefill(model, cache, prompts)
        rows = [[t] for t in pending.tolist()]
        accepted = drafted = 0
        while min(len(r) for r in rows) < new:
            tokens, n, _, _ = speculative_step(model, cache, pending, 3, sampler, config)
            for b, k in enumerate(n.tolist()):
                rows[b].extend(tokens[b, :k + 1].tolist())
            pending = tokens.gather(1, n.view(-1, 1)).view(-1)
            accepted += int(n.sum())
            drafted += 3 * len(prompts)
    got = torch.tensor([r[:new] for r in rows])
    assert torch.equal(got, expected), (got != expected).nonzero()[:5]
    assert accepted > 0.3 * drafted  # the 4-bit view drafts well on a random model
    # the cache holds the prompt and every emitted token but the pending one (tensor-level
    # equality with plain decoding after rollbacks: python_tests/cache/)
    assert cache.seq_lengths() == [len(p) + len(r) - 1 for p, r in zip(prompts, rows)]
