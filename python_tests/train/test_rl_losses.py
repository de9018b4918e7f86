"""GRPO losses (train/rl_losses.py) against hand-written references on fixed tensors."""
from __future__ import annotations

import math

import pytest
import torch

from qwen3_fast.train import rl_losses as L


def _std(xs):  # unbiased, written out
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_group_advantages_every_mode():
    r = [1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0]  # two groups of 4
    groups = [r[:4], r[4:]]
    got = {m: L.group_advantages(torch.tensor(r), 4, m).tolist() for m in L.ADVANTAGE_MODES}
    batch_std = _std(r)
    want_group, want_batch, want_none = [], [], []
    for g in groups:
        mean = sum(g) / 4
        want_group += [(x - mean) / (_std(g) + 1e-4) for x in g]
        want_batch += [(x - mean) / (batch_std + 1e-4) for x in g]
        want_none += [x - mean for x in g]
    for mode, want in (("group", want_group), ("batch", want_batch), ("none", want_none)):
        assert got[mode] == pytest.approx(want, rel=1e-6, abs=1e-6), mode
    # a group whose rewards are all equal carries no signal
    flat = L.group_advantages(torch.tensor([0.5, 0.5, 1.0, 0.0]), 2, "group")
    assert flat[:2].tolist() == [0.0, 0.0] and flat[2] > 0 > flat[3]


def test_group_advantages_checks():
    with pytest.raises(ValueError, match="group_size"):
        L.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="mode"):
        L.group_advantages(torch.zeros(4), 2, "token")


def _ref_token_loss(lp, old, a, lo, hi):
    ratio = math.exp(lp - old)
    return -min(ratio * a, min(max(ratio, 1 - lo), 1 + hi) * a)


def test_clipped_policy_loss_both_bounds_and_gradients():
    lo, hi = 0.2, 0.28
    # ratios 0.5 (below 1 - lo), 1.0, 1.2 (inside), 1.5 (above 1 + hi); A = +1 and -1 rows
    ratios = torch.tensor([0.5, 1.0, 1.2, 1.5])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    logp = (old + ratios.log()).repeat(2, 1).requires_grad_(True)
    old2 = old.repeat(2, 1)
    adv = torch.tensor([1.0, -1.0])
    loss, low, high = L.clipped_policy_loss(logp, old2, adv, lo, hi)
    want = [[_ref_token_loss(logp[b, t].item(), old2[b, t].item(), adv[b].item(), lo, hi)
             for t in range(4)] for b in range(2)]
    assert loss.tolist() == [pytest.approx(w, rel=1e-6) for w in want]
    # A > 0 clips above 1 + hi only; A < 0 clips below 1 - lo only
    assert high.tolist() == [[False, False, False, True], [False] * 4]
    assert low.tolist() == [[False] * 4, [True, False, False, False]]
    loss.sum().backward()
    g = logp.grad
    # clipped tokens have no gradient; elsewhere d(-ratio A)/d logp = -ratio A
    assert g[0, 3] == 0 and g[1, 0] == 0
    for b, t in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)):
        assert g[b, t].item() == pytest.approx(-ratios[t].item() * adv[b].item(), rel=1e-5)


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    ref = torch.tensor([[-1.0, -1.5, -2.0]])
    got = L.k3_kl(logp, ref)
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp[0].tolist(), ref[0].tolist())]
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    assert got[0, 0] == 0 and (got >= 0).all()


# per-token values and the completion mask of a 3-sequence batch (prompt / padding = 0)
VALUES = torch.tensor([[9.0, 1.0, 2.0, 3.0, 7.0],
                       [9.0, 9.0, 4.0, 8.0, 8.0],
                       [9.0, 5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[0, 1, 1, 1, 0],
                     [0, 0, 1, 0, 0],
                     [0, 1, 1, 1, 1]], dtype=torch.bool)


def _rows():
    return [[v for v, m in zip(VALUES[b].tolist(), MASK[b].tolist()) if m] for b in range(3)]


def test_aggregate_every_normalization():
    rows = _rows()  # [[1, 2, 3], [4], [5, 6, 7, 8]]
    total, n_tok = sum(map(sum, rows)), sum(map(len, rows))
    want = {"grpo": sum(sum(r) / len(r) for r in rows) / 3,
            "bnpo": total / n_tok,
            "dr_grpo": total / (3 * 16),
            "dapo": total / n_tok}
    for norm, w in want.items():
        got = L.aggregate(VALUES, MASK, norm, max_completion_length=16).item()
        assert got == pytest.approx(w, rel=1e-6), norm
    assert L.aggregate(VALUES, MASK, "dr_grpo").item() == pytest.approx(total / (3 * 5))


def test_aggregate_micro_batches_sum_to_the_step():
    """grpo, dr_grpo and dapo normalize over the whole step; bnpo over each micro-batch."""
    n_tok = int(MASK.sum())
    for norm in ("grpo", "dr_grpo", "dapo"):
        full = L.aggregate(VALUES, MASK, norm, max_completion_length=8)
        parts = [L.aggregate(VALUES[s], MASK[s], norm, num_sequences=3, num_tokens=n_tok,
                             max_completion_length=8, num_micro_batches=2)
                 for s in (slice(0, 2), slice(2, 3))]
        assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6), norm
    rows = _rows()
    bnpo = sum(L.aggregate(VALUES[s], MASK[s], "bnpo", num_micro_batches=2)
               for s in (slice(0, 2), slice(2, 3)))
    want = (sum(rows[0] + rows[1]) / 4 + sum(rows[2]) / 4) / 2
    assert bnpo.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("norm", L.NORMALIZATIONS)
def test_masked_positions_carry_no_loss_or_gradient(norm):
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    old = logp.detach() - 0.1
    adv = torch.tensor([1.0, -2.0, 0.5])
    per_tok = L.clipped_policy_loss(logp, old, adv, 0.2, 0.28)[0] + 0.1 * L.k3_kl(logp, old)
    loss = L.aggregate(per_tok, MASK, norm)
    loss.backward()
    assert (logp.grad[~MASK] == 0).all() and (logp.grad[MASK] != 0).all()
    # changing the prompt / padding positions changes nothing
    noisy = per_tok.detach().clone()
    noisy[~MASK] = 1e6
    assert L.aggregate(noisy, MASK, norm).item() == pytest.approx(loss.item(), rel=1e-6)


def test_full_grpo_loss_matches_a_hand_written_reference():
    """policy loss + beta * k3 KL - alpha * entropy, grpo normalization, written as loops."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(2, 4, generator=g) * 3
    old = logp + 0.4 * (torch.rand(2, 4, generator=g) - 0.5)
    ref = logp + 0.3 * (torch.rand(2, 4, generator=g) - 0.5)
    ent = torch.rand(2, 4, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    adv, beta, alpha = torch.tensor([0.7, -1.3]), 0.04, 0.01
    per_tok = (L.clipped_policy_loss(logp, old, adv, 0.1, 0.15)[0]
               + beta * L.k3_kl(logp, ref) - alpha * ent)
    got = L.aggregate(per_tok, mask, "grpo").item()
    seq_means = []
    for b in range(2):
        terms = []
        for t in range(4):
            if not mask[b, t]:
                continue
            p, o, r = logp[b, t].item(), old[b, t].item(), ref[b, t].item()
            kl = math.exp(r - p) - (r - p) - 1
            terms.append(_ref_token_loss(p, o, adv[b].item(), 0.1, 0.15) + beta * kl
                         - alpha * ent[b, t].item())
        seq_means.append(sum(terms) / len(terms))
    assert got == pytest.approx(sum(seq_means) / 2, rel=1e-5)


def test_entropy_controller_rises_below_target_falls_above_within_bounds():
    c = L.EntropyController(target=0.2, delta=0.005, init=0.0, c_min=0.0, c_max=0.012)
    # below the target: alpha_k = c_k, c rises by delta per step until c_max
    assert c.step(0.1) == 0.0 and c.coef == pytest.approx(0.005)
    assert c.step(0.1) == pytest.approx(0.005) and c.coef == pytest.approx(0.010)
    assert c.step(0.15) == pytest.approx(0.010) and c.coef == pytest.approx(0.012)  # c_max
    assert c.step(0.1) == pytest.approx(0.012) and c.coef == pytest.approx(0.012)
    # above the target: no bonus, c falls by delta, never below c_min
    assert c.step(0.3) == 0.0 and c.coef == pytest.approx(0.007)
    state = c.state_dict()
    assert c.step(0.25) == 0.0 and c.coef == pytest.approx(0.002)
    assert c.step(0.25) == 0.0 and c.coef == 0.0
    # resume: the saved coefficient comes back
    d = L.EntropyController(target=0.2, delta=0.005, c_max=0.012)
    d.load_state_dict(state)
    assert d.coef == pytest.approx(0.007) and d.alpha(0.1) == pytest.approx(0.007)
    with pytest.raises(ValueError, match="c_min"):
        L.EntropyController(c_min=0.1, c_max=0.05)
