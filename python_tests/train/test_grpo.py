"""The GRPO recipe (train/grpo.py, train/grpo_step.py) on tiny random models, CPU."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from qwen3_fast.cli import main as cli_main
from qwen3_fast.train.config import ConfigError, load_config
from qwen3_fast.train.grpo import STAGES, run
from qwen3_fast.train.grpo_step import IGNORE_INDEX, pad_batch, token_logprobs

from train_testlib import RECIPES, metrics, one_thread  # noqa: F401 (fixture)

# A toy verifiable task a tiny random model learns in a few dozen steps: the reward is the
# share of punctuation among the reply's visible characters. About 16% of the test
# tokenizer's 512 tokens hold punctuation (the single-byte tokens and pieces like '":'), so
# random replies score ~0.1 with a wide spread inside each group: a dense signal.
TOY_REWARD = '''
import string

def punctuation_share(text, sample):
    chars = [c for c in text if not c.isspace()]
    return sum(c in string.punctuation for c in chars) / max(len(chars), 1)
'''


def grpo_config(recipe: str, out_dir, *overrides: str):
    return load_config(str(RECIPES / f"{recipe}.yaml"),
                       [f"output_dir={out_dir}", "progress=false", *overrides], stages=STAGES)


def test_pad_batch_targets_cover_completions_only():
    ids, targets = pad_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t predicts token t+1: the completion tokens, nothing else
    assert targets.tolist() == [[-100, -100, 5, 6, -100], [7, 8, 9, -100, -100]]


def test_token_logprobs_match_full_logits(one_thread):
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config.from_name(
        "Qwen3-0.6B", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=64, tie_word_embeddings=False))
    ids, targets = pad_batch([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]], pad_id=0)
    lp, ent = token_logprobs(model, ids, targets, temperature=0.7)
    logp = torch.log_softmax(model(ids).logits.float() / 0.7, dim=-1)  # [B, S, V]
    mask = targets != IGNORE_INDEX
    want = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(lp[mask], want[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent[mask], -(logp.exp() * logp).sum(-1)[mask], rtol=1e-4,
                               atol=1e-5)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()


def test_grpo_raises_mean_reward_on_a_toy_task(tmp_path, monkeypatch, one_thread):
    """~10 s on a loaded 2-core machine: 14 GRPO steps of 4 prompts x 8 completions."""
    cfg = grpo_config("grpo_reasoning_tiny", tmp_path / "run", "steps=14", "save_every=0",
                      "seed=0", "precision=fp32", "optim.lr=2e-2", "micro_batch_size=32",
                      _toy_reward(tmp_path, monkeypatch),
                      "loss.beta=0", "loss.ppo_epochs=1", "entropy.control=false",
                      "rollout.max_new_tokens=8", "rollout.num_generations=8",
                      "rollout.prompts_per_step=4")
    losses = run(cfg)
    assert len(losses) == 14
    rewards = [r["reward"] for r in metrics(tmp_path / "run")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.25 and last > first + 0.25, rewards
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_resume_is_exact_with_kl_and_entropy_control(tmp_path, one_thread):
    """3 steps straight vs 2 steps, stop, resume to 3: identical metrics (rollouts,
    rewards, losses, KL, the entropy coefficient) and identical final weights."""
    common = ["steps=3", "save_every=1", "rollout.prompts_per_step=2",
              "rollout.num_generations=2", "rollout.max_new_tokens=6", "loss.beta=0.05",
              "loss.ppo_epochs=2", "loss.normalization=grpo", "micro_batch_size=3",
              "entropy.target=100", "entropy.delta=0.01", "optim.lr=1e-2", "precision=fp32"]
    run(grpo_config("grpo_reasoning_tiny", tmp_path / "a", *common))
    run(grpo_config("grpo_reasoning_tiny", tmp_path / "b", *common, "stop_after=2"))
    run(grpo_config("grpo_reasoning_tiny", tmp_path / "b", *common))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    keys = ("reward", "loss", "kl", "entropy", "entropy_coef", "entropy_c", "clip_low",
            "response_length", "grad_norm")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[-1]["entropy_c"] == pytest.approx(0.03)  # below target: +delta per step
    assert a[-1]["entropy_coef"] == pytest.approx(0.02)
    assert a[-1]["kl"] > 0
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _toy_reward(tmp_path, monkeypatch) -> str:
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_reward", raising=False)
    return "rewards=[{name: callable, function: 'toy_reward:punctuation_share'}]"


def test_single_pass_update_equals_the_two_pass_one(tmp_path, monkeypatch, one_thread):
    """One PPO epoch without entropy control skips the policy's no-grad pass (the old
    log-probs are the update's own, detached): the same step as with the extra pass."""
    from qwen3_fast.train.grpo_step import GRPOTrainer

    args = [_toy_reward(tmp_path, monkeypatch), "steps=2", "save_every=0", "rollout.prompts_per_step=2",
            "rollout.num_generations=2", "rollout.max_new_tokens=5", "loss.beta=0.05",
            "loss.ppo_epochs=1", "entropy.control=false", "micro_batch_size=3",
            "optim.lr=1e-2", "precision=fp32"]
    records = []
    for force in (False, True):
        trainer = GRPOTrainer(grpo_config("grpo_reasoning_tiny", tmp_path / str(force), *args))
        trainer.force_old_pass = force
        assert trainer.needs_old_pass() is force
        records.append([trainer.step(i) for i in range(2)])
    keys = ("reward", "loss", "kl", "entropy", "clip_low", "grad_norm")
    for fast, full in zip(*records):
        assert [fast[k] for k in keys] == pytest.approx([full[k] for k in keys], rel=1e-5,
                                                        abs=1e-7)
    assert records[0][1]["kl"] > 0 and records[0][0]["entropy"] > 0


def test_general_rl_recipe_through_the_cli(tmp_path, one_thread):
    out = tmp_path / "general"
    rc = cli_main(["train", "grpo", "--config", str(RECIPES / "grpo_general_tiny.yaml"),
                   f"output_dir={out}", "steps=2", "progress=false",
                   "rollout.max_new_tokens=6"])
    assert rc == 0
    recs = metrics(out)
    assert len(recs) == 2
    for key in ("reward", "accuracy", "entropy", "entropy_coef", "kl", "clip_low",
                "clip_high", "response_length", "rollout_s", "scoring_s", "update_s"):
        assert key in recs[0], key
    # the task mix reached every task's rewards
    seen = {k for r in recs for k in r if k.startswith("reward/")}
    assert {"reward/format"} < seen and len(seen) >= 3, seen
    with open(out / "model" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["num_hidden_layers"] == 2
    # the next stage starts from it
    from safetensors.torch import load_file

    from qwen3_fast.train.grpo_step import GRPOTrainer

    trainer = GRPOTrainer(grpo_config("grpo_reasoning_tiny", tmp_path / "next",
                                      f"model.init_from={out / 'model'}", "steps=1",
                                      "rollout.max_new_tokens=4"))
    saved = load_file(str(out / "model" / "model.safetensors"))
    state = trainer.policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert len(trainer.train()) == 1


def test_config_checks():
    with pytest.raises(ConfigError, match="general RL mixes reward types per task"):
        grpo_config("grpo_general_tiny", "/tmp/x", "rewards=[{name: math}]")
    with pytest.raises(ConfigError, match="loss.normalization"):
        grpo_config("grpo_reasoning_tiny", "/tmp/x", "loss.normalization=sum")
    with pytest.raises(ConfigError, match="rollout.num_generations"):
        grpo_config("grpo_reasoning_tiny", "/tmp/x", "rollout.num_generations=1")
    with pytest.raises(ConfigError, match="rewards.0.name"):
        grpo_config("grpo_reasoning_tiny", "/tmp/x", "rewards=[{name: magic}]")
    cfg = grpo_config("grpo_reasoning_tiny", "/tmp/x")
    assert cfg.stage == "reasoning_rl" and cfg.loss.eps_high == 0.28
    assert [r.name for r in cfg.rewards] == ["math", "format"]
