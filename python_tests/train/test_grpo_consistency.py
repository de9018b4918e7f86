"""GRPO's rollout and update agree with each other (train/grpo_step.py), on a tiny model.

- the engine samples exactly the distribution the trainer scores: the tempered softmax at
  rollout.temperature, with the completion tokens aligned to the positions that predict
  them (then E[log p(sampled token)] = -H token by token, so the two batch means agree);
- one update moves each completion's log-probability the way its advantage says, under the
  demo's bf16 autocast and two PPO epochs;
- the entropy bonus raises the entropy (its sign);
- under bf16 autocast the LM head and log-softmax still run in fp32 (bf16 logits put
  ~0.09 nats of rounding into these log-probs, and so into the PPO ratio).
"""
from __future__ import annotations

import torch

from qwen3_fast.train.config import load_config
from qwen3_fast.train.grpo import STAGES
from qwen3_fast.train.grpo_step import IGNORE_INDEX, GRPOTrainer, Rollout, token_logprobs
from qwen3_fast.train.rl_losses import group_advantages

from train_testlib import RECIPES, one_thread  # noqa: F401 (fixture)


def _trainer(tmp_path, *overrides: str) -> GRPOTrainer:
    cfg = load_config(str(RECIPES / "grpo_reasoning_tiny.yaml"),
                      [f"output_dir={tmp_path / 'run'}", "progress=false", "seed=0",
                       "loss.beta=0", "micro_batch_size=8", *overrides], stages=STAGES)
    trainer = GRPOTrainer(cfg)
    # a random init is nearly uniform over the vocabulary, where every temperature gives
    # about the same distribution; a peaked head makes the temperature matter
    with torch.no_grad():
        trainer.policy.lm_head.weight.mul_(40.0)
    return trainer


def _batch_means(trainer: GRPOTrainer, ro: Rollout, temperature: float):
    lp_sum = ent_sum = n = 0.0
    for _start, ids, targets in trainer._micro_batches(ro):
        mask = targets != IGNORE_INDEX
        with torch.no_grad(), trainer.autocast:
            lp, ent = token_logprobs(trainer.policy, ids, targets, temperature)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        lp_sum += float(lp[mask].sum())
        ent_sum += float(ent[mask].sum())
        n += float(mask.sum())
    return lp_sum / n, ent_sum / n, n


def test_rollout_samples_the_tempered_distribution_the_trainer_scores(tmp_path, one_thread):
    trainer = _trainer(tmp_path, "precision=bf16", "rollout.temperature=0.6",
                       "rollout.prompts_per_step=4", "rollout.num_generations=8",
                       "rollout.max_new_tokens=24")
    ro = trainer.rollout(0)
    eos = set(trainer.engine.eos_token_ids)
    for ids, trunc in zip(ro.completion_ids, ro.truncated):
        assert ids and (trunc or ids[-1] in eos)  # the stop token is scored too
    lp, ent, n = _batch_means(trainer, ro, 0.6)
    assert n > 500 and 0.3 < ent < 4.0, (n, ent)
    # E[log p(x)] = -H over the sampled tokens; a few hundred tokens: ~0.05 nats of noise
    assert abs(lp + ent) < 0.15, (lp, ent)
    # the check has teeth: the untempered distribution scores the same tokens differently
    lp1, ent1, _ = _batch_means(trainer, ro, 1.0)
    assert abs(lp1 + ent1) > 0.3, (lp1, ent1)


def _sequence_logprobs(trainer: GRPOTrainer, ro: Rollout) -> torch.Tensor:
    out = []
    for _start, ids, targets in trainer._micro_batches(ro):
        with torch.no_grad():
            lp, _ = token_logprobs(trainer.policy, ids, targets, trainer.cfg.rollout.temperature)
        out.append(lp.sum(dim=1))
    return torch.cat(out)


def test_update_moves_each_completion_with_its_advantage(tmp_path, one_thread):
    trainer = _trainer(tmp_path, "precision=bf16", "loss.ppo_epochs=2", "optim.lr=1e-4",
                       "rollout.prompts_per_step=2", "rollout.num_generations=4",
                       "rollout.max_new_tokens=12")
    ro = trainer.rollout(0)
    # rewarded: the first two replies of each prompt's group
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0] * 2)
    adv = group_advantages(rewards, 4)
    before = _sequence_logprobs(trainer, ro)
    old, ref, entropy, _kl = trainer.old_pass(ro)
    assert entropy is not None and all(o is not None for o in old)
    trainer.update(ro, adv, 0.0, old, ref)
    delta = _sequence_logprobs(trainer, ro) - before
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all(), (adv, delta)


def test_entropy_bonus_raises_entropy(tmp_path, one_thread):
    trainer = _trainer(tmp_path, "precision=fp32", "loss.ppo_epochs=1", "optim.lr=1e-4",
                       "rollout.prompts_per_step=2", "rollout.num_generations=2",
                       "rollout.max_new_tokens=12")
    ro = trainer.rollout(0)
    _lp, h0, _ = _batch_means(trainer, ro, 1.0)
    old, ref, _h, _kl = trainer.old_pass(ro)
    # no advantage at all: the step is the entropy bonus alone
    trainer.update(ro, torch.zeros(len(ro.prompt_ids)), 0.05, old, ref)
    _lp, h1, _ = _batch_means(trainer, ro, 1.0)
    assert h1 > h0 + 0.1, (h0, h1)


def test_logprobs_use_an_fp32_head_under_bf16_autocast(tmp_path, one_thread):
    """The body may run in bf16, the LM head and log-softmax do not: bf16 logits would put
    rounding of ~0.1 nats into the PPO ratio of a peaked distribution."""
    trainer = _trainer(tmp_path, "precision=bf16", "rollout.prompts_per_step=2",
                       "rollout.num_generations=2", "rollout.max_new_tokens=12")
    ro = trainer.rollout(0)
    _start, ids, targets = next(trainer._micro_batches(ro))
    mask = targets != IGNORE_INDEX
    model = trainer.policy
    with torch.no_grad(), trainer.autocast:
        lp, ent = token_logprobs(model, ids, targets, 0.8)
        hidden = model(ids, return_logits=False).hidden_states
    logits = hidden.float() @ model.lm_head.weight.float().t()
    logp = torch.log_softmax(logits / 0.8, dim=-1)
    want = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(lp[mask], want[mask], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent[mask], -(logp.exp() * logp).sum(-1)[mask], rtol=1e-5,
                               atol=1e-4)
