"""The demo's stage runner: every stage of the Qwen3 recipe, in order, resumable.

A stage is (name, recipe, config dict). The runner writes the dict to
``<out>/configs/<name>.yaml`` and runs it exactly as ``qwen3-fast train <recipe> --config
<out>/configs/<name>.yaml`` would (train.recipes.recipe_module + load_config + run); the
stage's output is ``<out>/<name>/`` with the model in ``<out>/<name>/model`` (HF format with
its tokenizer: ``qwen3-fast chat --model <out>/<name>/model`` talks to it). Then it
evaluates the model (demo/evaluate.py) and writes ``<out>/<name>/DONE`` (JSON: wall and CPU
seconds of training and evaluation, the losses' summary, the figures).

- Resume: a stage with DONE is skipped (its figures are read back), so rerunning the same
  command continues where it stopped; a stage interrupted mid-way resumes from its own
  latest checkpoint (``resume: true``).
- Crash: the failing stage is named with its error, earlier stages' checkpoints and DONE
  files stay, and the command exits non-zero.

Stages (teacher, then a smaller student two ways):

    s1 -> s2 -> s3 -> cold_start -> reasoning_rl -> fusion -> general_rl     (teacher)
    student_base (the student's own short pre-training, shared by both routes)
    off_policy -> on_policy          distillation from the final teacher (general_rl)
    student_cold_start -> student_rl the same student trained by RL directly: its own
                                     cold start on the same traces, then reasoning RL

reasoning_rl and student_rl first keep the RL prompts their starting policy solves only
sometimes (stages.filter_rl_prompts, Qwen3's query filtering); that sampling counts in the
stage's CPU-seconds.

The two student routes start from the same student_base and their CPU-seconds
(training + the teacher's generation inside off_policy / on_policy) are compared; the base
is not counted in either.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml


# ------------------------------------------------------------------ sizes
# Model shapes: the teacher is tiny and the student smaller; `quick` shrinks both.
TEACHER = {"default": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32),
           "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)}
STUDENT = {"default": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16),
           "quick": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)}
# --moe: the teacher's MLPs become routed experts (Qwen3 MoE fields)
MOE = {"default": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                       decoder_sparse_step=1, norm_topk_prob=True),
       "quick": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                     decoder_sparse_step=1, norm_topk_prob=True)}

SETTINGS = {
    "default": dict(
        vocab_size=384, seq_len=256, long_seq_len=768, sft_seq_len=512, mb=8,
        steps=dict(s1=250, s2=150, s3=10, cold_start=250, reasoning_rl=40, fusion=120,
                   general_rl=16, student_base=300, off_policy=80, on_policy=16,
                   student_cold_start=100, student_rl=30),
        sizes=dict(general=3000, reasoning=3000, long=200, sft=1000, rl=600, distill=80,
                   eval=120),
        rollout=dict(prompts_per_step=8, num_generations=4, max_new_tokens=96),
        # the teacher's two RL stages: bigger groups (a steadier advantage per prompt)
        teacher_rollout={"reasoning_rl": dict(prompts_per_step=6, num_generations=8),
                         "general_rl": dict(prompts_per_step=8, num_generations=8)},
        filter=dict(candidates=128, k=4, min_keep=32, batch=128),
        eval_modes=None, eval_batch=120, eval_seq=320, max_think_tokens=128,
        budgets=[0, 8, 16, 32, 64], pass_k=4, pass_k_problems=None, spec_new_tokens=192,
        distill_new_tokens=96),
    "quick": dict(
        vocab_size=320, seq_len=128, long_seq_len=384, sft_seq_len=384, mb=4,
        steps=dict(s1=24, s2=16, s3=3, cold_start=16, reasoning_rl=2, fusion=12,
                   general_rl=2, student_base=16, off_policy=6, on_policy=2,
                   student_cold_start=8, student_rl=2),
        sizes=dict(general=200, reasoning=200, long=30, sft=120, rl=60, distill=6, eval=6),
        rollout=dict(prompts_per_step=2, num_generations=2, max_new_tokens=24),
        teacher_rollout={},
        filter=dict(candidates=12, k=2, min_keep=4, batch=24),
        eval_modes=6, eval_batch=12, eval_seq=160, max_think_tokens=32, budgets=[0, 8, 16],
        pass_k=2,
        pass_k_problems=4, spec_new_tokens=48, distill_new_tokens=24),
}

TEACHER_STAGES = ("s1", "s2", "s3", "cold_start", "reasoning_rl", "fusion", "general_rl")
DISTILL_ROUTE = ("off_policy", "on_policy")
RL_ROUTE = ("student_cold_start", "student_rl")


@dataclass
class Stage:
    """One step of the demo. `train(out_dir)` trains (None: nothing to train) and returns
    its per-step losses; `evaluate(out_dir)` returns the stage's figures."""

    name: str
    recipe: Optional[str] = None
    config: Optional[dict] = None
    extras: tuple = ()  # extra evaluations (evaluate.py: budget, pass_at_k, speculative)
    train: Optional[Callable[[str], list]] = None
    evaluate: Optional[Callable[[str], dict]] = None
    meta: dict = field(default_factory=dict)


def run_recipe(recipe: str, config: dict, config_path: str) -> list[float]:
    """Write `config` to `config_path` and run it as ``qwen3-fast train <recipe>`` does."""
    from qwen3_fast.train.config import load_config
    from qwen3_fast.train.recipes import recipe_module

    os.makedirs(os.path.dirname(config_path), exist_ok=True)
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    module = recipe_module(recipe)
    cfg = load_config(config_path, [], stages=module.STAGES)
    return list(module.run(cfg) or [])


def _finite_summary(losses: list) -> dict:
    return {"steps_run": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def run_stages(out: str, stages: list[Stage], log=print) -> int:
    """Run `stages` in order under `out` (module docstring); 0 when all are done, 1 when
    one failed (named on stderr, earlier ones kept)."""
    n = len(stages)
    for i, st in enumerate(stages, 1):
        stage_dir = os.path.join(out, st.name)
        done = os.path.join(stage_dir, "DONE")
        if os.path.isfile(done):
            log(f"[{i}/{n}] {st.name}: done earlier, skipped ({done})")
            continue
        log(f"[{i}/{n}] {st.name}: {st.recipe or 'custom'} ...")
        os.makedirs(stage_dir, exist_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            losses = st.train(stage_dir) if st.train else []
            t1, c1 = time.perf_counter(), time.process_time()
            figures = st.evaluate(stage_dir) if st.evaluate else {}
        except (Exception, KeyboardInterrupt) as e:
            print(f"\nstage {st.name!r} failed: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            kept = [s.name for s in stages[:i - 1]
                    if os.path.isfile(os.path.join(out, s.name, "DONE"))]
            print(f"earlier stages kept: {', '.join(kept) or 'none'}; rerun the same command "
                  f"to resume from stage {st.name!r}", file=sys.stderr)
            return 130 if isinstance(e, KeyboardInterrupt) else 1
        t2, c2 = time.perf_counter(), time.process_time()
        record = {"stage": st.name, "recipe": st.recipe, "train_seconds": t1 - t0,
                  "train_cpu_seconds": c1 - c0, "eval_seconds": t2 - t1,
                  "eval_cpu_seconds": c2 - c1, **_finite_summary(losses),
                  "figures": figures, "meta": st.meta}
        tmp = done + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, done)
        acc = ""
        if "acc_think" in figures:
            acc = (f", acc think {figures['acc_think']:.2f} / no-think "
                   f"{figures['acc_no_think']:.2f}, mode-following "
                   f"{figures['mode_following']:.2f}")
        log(f"[{i}/{n}] {st.name}: done in {t2 - t0:.0f}s (train {t1 - t0:.0f}s, "
            f"{c1 - c0:.0f} CPU-s){acc}")
    return 0


def read_done(out: str, name: str) -> Optional[dict]:
    path = os.path.join(out, name, "DONE")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["DISTILL_ROUTE", "MOE", "RL_ROUTE", "SETTINGS", "STUDENT", "Stage", "TEACHER",
           "TEACHER_STAGES", "read_done", "run_recipe", "run_stages"]
