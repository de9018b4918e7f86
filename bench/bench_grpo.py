"""One GRPO step (train/grpo_step.py) on a tiny model, CPU: rollout / scoring / update.

Each benchmark round is one full step: the engine samples prompts x G completions from the
live policy, the rewards (math-verify + format) score them, then the update runs the
no-grad pass (old log-probs, entropy, reference log-probs with beta > 0) and one AdamW
step over the batch. The split of the median step goes to ``extra_info`` (rollout_s,
scoring_s, update_s) and the printed line.

Implementations in the same run: ``qwen3_fast`` (the default backends: the fused
``ops.linear_logprobs``, so no [T, V] logits) and ``reference`` (every op forced to its
unfused torch reference, ``use_backend("reference")``: full logits, plain attention, ...).
No TRL baseline: TRL is not a dependency and its GRPO trainer drives HF generate or vLLM,
not a comparable in-process loop.

Run: ``pytest bench/bench_grpo.py --benchmark-only -s``. Shapes (layers, hidden,
max_new_tokens): hidden 1024 is Qwen3-0.6B's width; the vocabulary is the 512-token test
tokenizer's. The first shape's id contains "-1-1024-" (the CI smoke filter).
"""
from __future__ import annotations

import os
import statistics
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1, 1024, 16), (2, 1024, 64)]
IMPLS = ["qwen3_fast", "reference"]


def build_trainer(out_dir: str, layers: int, hidden: int, new_tokens: int):
    from qwen3_fast.train.config import load_config
    from qwen3_fast.train.grpo import STAGES
    from qwen3_fast.train.grpo_step import GRPOTrainer

    heads = hidden // 128
    cfg = load_config(os.path.join(REPO, "recipes", "grpo_reasoning_tiny.yaml"), [
        f"output_dir={out_dir}", "progress=false", "resume=false", "steps=1000",
        "save_every=0", "precision=bf16", "micro_batch_size=8", "loss.beta=0.001",
        "loss.ppo_epochs=1", "rollout.prompts_per_step=4", "rollout.num_generations=4",
        f"rollout.max_new_tokens={new_tokens}",
        f"model.overrides.num_hidden_layers={layers}", f"model.overrides.hidden_size={hidden}",
        f"model.overrides.intermediate_size={3 * hidden}",
        f"model.overrides.num_attention_heads={heads}",
        f"model.overrides.num_key_value_heads={max(1, heads // 2)}",
        "model.overrides.head_dim=128"], stages=STAGES)
    return GRPOTrainer(cfg)


@pytest.mark.parametrize("layers,hidden,new_tokens", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_step_cpu(benchmark, tmp_path, impl, layers, hidden, new_tokens):
    from qwen3_fast.ops import use_backend

    trainer = build_trainer(str(tmp_path), layers, hidden, new_tokens)
    records = []
    counter = iter(range(1 << 30))

    def step():
        with use_backend("reference" if impl == "reference" else None):
            records.append(trainer.step(next(counter)))

    benchmark.group = f"cpu-grpo_step-{layers}L-H{hidden}-new{new_tokens}-16seqs"
    benchmark.pedantic(step, rounds=2, warmup_rounds=1, iterations=1)
    timed = records[1:] or records  # the warm-up round is not timed (--benchmark-disable: one)
    split = {k: statistics.median(r[k] for r in timed)
             for k in ("rollout_s", "scoring_s", "update_s", "response_length")}
    benchmark.extra_info.update(impl=impl, device="cpu", sequences=16, **split)
    print(f"\n{impl} {layers}L H{hidden}: rollout {split['rollout_s']:.3f}s, scoring "
          f"{split['scoring_s']:.3f}s, update {split['update_s']:.3f}s "
          f"(mean reply {split['response_length']:.1f} tokens)")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-s"]))
