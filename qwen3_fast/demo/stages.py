"""The demo's concrete stages: data preparation and one config dict per recipe stage
(the field names of train/config.py, train/sft.py, train/grpo.py, train/distill.py).

:func:`build_stages` returns the list demo/pipeline.py runs; :func:`prepare` writes the
data files, the fusion mix and the tokenizer once (``<out>/data``, ``<out>/tokenizer``).
"""
from __future__ import annotations

import json
import os
import random
from functools import partial

from qwen3_fast.demo.pipeline import (MOE, SETTINGS, STUDENT, TEACHER, Stage, run_recipe)
from qwen3_fast.demo.tasks import TASKS

REWARD_FN = "qwen3_fast.demo.tasks:task_reward"
REWARD_IN_MODE_FN = "qwen3_fast.demo.tasks:task_reward_in_mode"


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(path: str, records) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def general_rl_prompts(records: list[dict], seed: int) -> list[dict]:
    """General-RL prompts: the task prompts asked in both modes, a quarter each through
    enable_thinking false, the /no_think flag, the /think flag, and no flag."""
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(records):
        r = json.loads(json.dumps(r))
        kind = i % 4
        if kind == 0:
            r["enable_thinking"] = False
        elif kind in (1, 2):
            r["messages"][-1]["content"] += " /no_think" if kind == 1 else " /think"
        out.append(r)
    rng.shuffle(out)
    return out


def filter_rl_prompts(model_dir: str, src: str, dst: str, settings: dict, seed: int = 0
                      ) -> dict:
    """Qwen3's query filtering for reasoning RL, on the policy that RL starts from: sample
    ``filter.k`` replies to each of the first ``filter.candidates`` prompts of `src` (at the
    rollout's temperature and length) and keep those it solves sometimes but not always: only
    they give a GRPO group a nonzero advantage. When fewer than ``filter.min_keep`` pass
    (a very weak policy), the never-solved prompts fill up, then the always-solved ones.
    Writes the kept records to `dst` (reused when it exists: a resumed stage keeps its prompt
    order) and the counts to ``<dst>.json``; returns them."""
    from qwen3_fast.demo.evaluate import pass_counts

    stats_path = dst + ".json"
    if os.path.isfile(dst) and os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            return json.load(f)
    fs, ro = settings["filter"], settings["rollout"]
    recs = _jsonl(src)[: fs["candidates"]]
    k = fs["k"]
    counts = pass_counts(model_dir, recs, k, ro["max_new_tokens"], temperature=1.0,
                         batch=fs["batch"], seed=seed)
    mixed = [r for r, c in zip(recs, counts) if 0 < c < k]
    keep = list(mixed)
    for fill in (0, k):
        if len(keep) < fs["min_keep"]:
            keep += [r for r, c in zip(recs, counts) if c == fill][: fs["min_keep"] - len(keep)]
    _write(dst, keep)
    stats = {"candidates": len(recs), "k": k, "kept": len(keep), "mixed": len(mixed),
             "pass_histogram": [sum(c == j for c in counts) for j in range(k + 1)],
             "candidate_pass_rate": sum(counts) / (k * len(recs))}
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump(stats, f)
    return stats


def prepare(out: str, settings: dict, seed: int = 0) -> dict:
    """Data files, fusion mix and tokenizer (skipped when ``<out>/data/READY`` exists)."""
    from qwen3_fast.demo.data import build_tokenizer, write_data

    data_dir = os.path.join(out, "data")
    ready = os.path.join(data_dir, "READY")
    names = ("general", "reasoning", "long", "sft_think", "sft_no_think", "rl_prompts",
             "eval", "fusion", "rl_general", "distill_prompts")
    paths = {k: os.path.join(data_dir, ("pretrain_" + k if k in ("general", "reasoning", "long")
                                        else k) + ".jsonl") for k in names}
    paths["tokenizer"] = os.path.join(out, "tokenizer")
    if os.path.isfile(ready):
        return paths
    sizes = settings["sizes"]
    write_data(data_dir, sizes, seed)
    from qwen3_fast.train.fusion import build_fusion_samples

    mix = build_fusion_samples(_jsonl(paths["sft_think"]), _jsonl(paths["sft_no_think"]),
                               seed=seed, num_samples=sizes["sft"])
    _write(paths["fusion"], mix)
    rl = _jsonl(paths["rl_prompts"])
    _write(paths["rl_general"], general_rl_prompts(rl, seed))
    _write(paths["distill_prompts"], rl[: sizes["distill"]])
    build_tokenizer(paths["tokenizer"], settings["vocab_size"], seed)
    with open(ready, "w") as f:
        f.write("ok\n")
    return paths


def _model(shape: dict, vocab: int, moe: dict | None = None, init_from: str | None = None
           ) -> dict:
    if init_from:
        return {"init_from": init_from}
    overrides = dict(shape, vocab_size=vocab, max_position_embeddings=2048,
                     tie_word_embeddings=True)
    if moe:
        overrides.update(moe)
        return {"name": "Qwen3-30B-A3B", "overrides": overrides}
    return {"name": "Qwen3-0.6B", "overrides": overrides}


def build_stages(out: str, quick: bool = False, moe: bool = False, seed: int = 0
                 ) -> tuple[list[Stage], dict]:
    """The demo's stages (pipeline.py docstring) and the settings they use."""
    from qwen3_fast.demo import evaluate

    size = "quick" if quick else "default"
    st = dict(SETTINGS[size])
    steps = st["steps"]
    out = os.path.abspath(out)
    paths = {k: os.path.join(out, "data", v) for k, v in {
        "general": "pretrain_general.jsonl", "reasoning": "pretrain_reasoning.jsonl",
        "long": "pretrain_long.jsonl", "sft_think": "sft_think.jsonl", "fusion": "fusion.jsonl",
        "rl_prompts": "rl_prompts.jsonl", "rl_general": "rl_general.jsonl",
        "distill_prompts": "distill_prompts.jsonl", "eval": "eval.jsonl"}.items()}
    tok = os.path.join(out, "tokenizer")
    vocab = st["vocab_size"]
    seq, mb = st["seq_len"], st["mb"]

    def model_of(name):
        return os.path.join(out, name, "model")

    def common(name, n_steps, lr, **kw):
        d = {"stage": kw.pop("stage", name), "output_dir": os.path.join(out, name),
             "steps": n_steps, "micro_batch_size": kw.pop("mb", mb), "grad_accum": 1,
             "precision": "bf16", "save_every": max(n_steps // 2, 1), "seed": seed,
             "progress": True, "device": "cpu",
             "optim": {"lr": lr, "warmup_steps": kw.pop("warmup", max(n_steps // 10, 1)),
                       "weight_decay": 0.0, "schedule": "cosine"}}
        d.update(kw)
        return d

    pre_data = lambda srcs, s=seq: {"tokenizer": tok, "seq_len": s, "sources": srcs}  # noqa
    src_g = {"path": paths["general"], "weight": 1.0}
    src_r = {"path": paths["reasoning"], "weight": 1.0, "domain": "reasoning"}
    teacher_shape, student_shape = TEACHER[size], STUDENT[size]
    long_seq = st["long_seq_len"]
    rollout = dict(st["rollout"], max_prompt_len=96, engine_batch_size=32)

    def teacher_rollout(name):
        ro = dict(rollout, temperature=1.0, **st["teacher_rollout"].get(name, {}))
        ro["engine_batch_size"] = max(32, ro["prompts_per_step"] * ro["num_generations"])
        return ro
    correct = {"name": "callable", "function": REWARD_FN, "label": "correct",
               "accuracy": True}
    # Reasoning RL (teacher and student) trains on the prompts its starting policy solves
    # only sometimes (filter_rl_prompts), chosen just before the stage from that policy.
    rl_start = {"reasoning_rl": "cold_start", "student_rl": "student_cold_start"}
    filtered = {n: os.path.join(out, n, "rl_prompts_filtered.jsonl") for n in rl_start}

    configs = {
        "s1": ("pretrain", common("s1", steps["s1"], 3e-3, model=_model(
            teacher_shape, vocab, MOE[size] if moe else None),
            data=pre_data([src_g, src_r]))),
        "s2": ("pretrain", common("s2", steps["s2"], 2e-3, warmup=0,
                                  model=_model(None, vocab, init_from=model_of("s1")),
                                  data=pre_data([src_g, dict(src_r, weight=3.0)]))),
        "s3": ("pretrain", common("s3", steps["s3"], 1e-3, mb=max(mb // 4, 1),
                                  model=_model(None, vocab, init_from=model_of("s2")),
                                  activation_checkpointing=False,
                                  data=dict(pre_data([{"path": paths["long"]}], long_seq),
                                            length_mix=[
                                                {"min_tokens": long_seq // 2,
                                                 "max_tokens": long_seq + 1, "weight": 0.75},
                                                {"min_tokens": long_seq // 8,
                                                 "max_tokens": long_seq // 2,
                                                 "weight": 0.25}]))),
        "cold_start": ("sft", common("cold_start", steps["cold_start"], 2e-3,
                                     model=_model(None, vocab, init_from=model_of("s3")),
                                     data=pre_data([{"path": paths["sft_think"]}], st["sft_seq_len"]))),
        "reasoning_rl": ("grpo", common(
            # lr 1e-4 with a 3-step warmup, one PPO epoch, groups of 8: a fresh AdamW's first
            # steps move every weight by about lr whatever its gradient, and at 2e-4 without
            # warmup and with two epochs one step cut the log-prob of a group's wrong
            # replies by ~8 nats each (the reward fell 0.42 -> 0.24). The entropy target
            # 0.1 sits below the cold-start policy's ~0.15 nats: the bonus acts only if the
            # entropy collapses (a target above it pushed the policy toward wrong tokens).
            # 40 steps (SETTINGS): the mean reward rose 0.38 -> 0.43 over 30, 0.40 -> 0.54
            # (first third -> last third) over 40.
            "reasoning_rl", steps["reasoning_rl"], 1e-4, mb=16, warmup=3,
            model=_model(None, vocab, init_from=model_of("cold_start")),
            data={"tokenizer": tok, "sources": [{"path": filtered["reasoning_rl"],
                                                 "domain": "math"}]},
            rollout=teacher_rollout("reasoning_rl"),
            loss={"advantage": "group", "eps_low": 0.2, "eps_high": 0.28, "beta": 0.0,
                  "normalization": "dapo", "ppo_epochs": 1},
            entropy={"control": True, "target": 0.1, "delta": 0.005, "max": 0.05},
            rewards=[correct, {"name": "format", "weight": 0.1}])),
        "fusion": ("sft", common("fusion", steps["fusion"], 1e-3,
                                 model=_model(None, vocab, init_from=model_of("reasoning_rl")),
                                 data=pre_data([{"path": paths["fusion"]}], st["sft_seq_len"]))),
        "general_rl": ("grpo", common(
            # per-sequence ("grpo") normalization, as recipes/grpo_general_tiny.yaml: the
            # mode decision is the first token of a reply, and a direct answer (2-3 tokens)
            # that beats its group's 50-token unwanted reasoning weighs as much as each of
            # them, where dapo's per-token mean drowned it (16 steps did not move the
            # enable_thinking=false mode-following, 0.22 -> 0.15; with grpo 0.22 -> 0.44)
            "general_rl", steps["general_rl"], 1e-4, mb=16, warmup=3,
            model=_model(None, vocab, init_from=model_of("fusion")),
            data={"tokenizer": tok, "sources": [{"path": paths["rl_general"]}]},
            rollout=teacher_rollout("general_rl"),
            loss={"advantage": "group", "normalization": "grpo", "beta": 0.0},
            # correctness counts only in the asked mode (tasks.task_reward_in_mode)
            rewards=[dict(correct, function=REWARD_IN_MODE_FN, tasks=list(TASKS)),
                     {"name": "mode", "weight": 0.5, "tasks": []},
                     {"name": "format", "weight": 0.2, "tasks": []}])),
        "student_base": ("pretrain", common(
            "student_base", steps["student_base"], 3e-3, stage="s1",
            model=_model(student_shape, vocab),
            data=pre_data([src_g, dict(src_r, weight=2.0)]))),
        "off_policy": ("distill", common(
            "off_policy", steps["off_policy"], 2e-3, teacher=model_of("general_rl"),
            modes=["thinking", "non_thinking"], samples_per_prompt=2,
            sampling={"max_new_tokens": st["distill_new_tokens"], "temperature": 0.6},
            keep_truncated=False, gen_batch_size=32, max_seq_len=320, topk_kd=8,
            kd_alpha=0.5, model=_model(None, vocab, init_from=model_of("student_base")),
            data=pre_data([{"path": paths["distill_prompts"]}], st["sft_seq_len"]))),
        "on_policy": ("distill", common(
            "on_policy", steps["on_policy"], 1e-3, teacher=model_of("general_rl"), beta=0.5,
            mode="both", mb=16,
            sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                      "presence_penalty": 0.0, "max_new_tokens": st["distill_new_tokens"]},
            gen_batch_size=32, max_seq_len=320,
            model=_model(None, vocab, init_from=model_of("off_policy")),
            data=pre_data([{"path": paths["rl_prompts"]}]))),
        "student_cold_start": ("sft", common(
            "student_cold_start", steps["student_cold_start"], 2e-3, stage="cold_start",
            model=_model(None, vocab, init_from=model_of("student_base")),
            data=pre_data([{"path": paths["sft_think"]}], st["sft_seq_len"]))),
        "student_rl": ("grpo", common(
            "student_rl", steps["student_rl"], 2e-4, mb=16, warmup=0, stage="reasoning_rl",
            model=_model(None, vocab, init_from=model_of("student_cold_start")),
            data={"tokenizer": tok, "sources": [{"path": filtered["student_rl"],
                                                 "domain": "math"}]},
            rollout=dict(rollout, temperature=1.0),
            loss={"advantage": "group", "normalization": "dapo", "ppo_epochs": 2},
            entropy={"control": True, "target": 0.3, "delta": 0.005, "max": 0.05},
            rewards=[correct, {"name": "format", "weight": 0.1}])),
    }
    eval_settings = dict(st, follow=True)
    records_cache: dict = {}

    def records():
        if "r" not in records_cache:
            records_cache["r"] = _jsonl(paths["eval"])
        return records_cache["r"]

    # The pre-trained bases have never seen the chat format: they get the loss curve only.
    # Mode-following over the /think and /no_think flags needs two more passes: asked where
    # the report compares it (before fusion, after fusion and general RL; --quick: after).
    no_eval = {"s1", "s2", "s3", "student_base"}
    follow_only = {"fusion", "general_rl"} if quick else {"cold_start", "fusion", "general_rl"}

    def do_eval(name, extras, stage_dir):
        sets = dict(eval_settings, follow=name in follow_only)
        return evaluate.evaluate_stage(model_of(name), records(), sets, extras)

    extras = {"general_rl": ("budget", "speculative"), "on_policy": ("pass_at_k",),
              "student_rl": ("pass_at_k",)}
    groups = {**{s: "teacher" for s in ("s1", "s2", "s3", "cold_start", "reasoning_rl",
                                         "fusion", "general_rl")},
              "student_base": "student_base", "off_policy": "distill",
              "on_policy": "distill", "student_cold_start": "rl", "student_rl": "rl"}
    def prepare_stage(stage_dir):
        prepare(out, st, seed)
        return []  # nothing trained

    def train_stage(recipe, cfg, name, stage_dir):
        if name in rl_start:
            filter_rl_prompts(model_of(rl_start[name]), paths["rl_prompts"], filtered[name],
                              st, seed)
        return run_recipe(recipe, cfg, os.path.join(out, "configs", name + ".yaml"))

    stages = [Stage(name="data", recipe="data files + tokenizer", train=prepare_stage,
                    meta={"group": "setup"})]
    for name, (recipe, cfg) in configs.items():
        stages.append(Stage(
            name=name, recipe=recipe, config=cfg, extras=extras.get(name, ()),
            train=partial(train_stage, recipe, cfg, name),
            evaluate=None if name in no_eval else partial(do_eval, name,
                                                          extras.get(name, ())),
            meta={"group": groups[name], "recipe_stage": cfg["stage"],
                  "model": model_of(name)}))
    return stages, st


__all__ = ["REWARD_FN", "REWARD_IN_MODE_FN", "build_stages", "filter_rl_prompts",
           "general_rl_prompts", "prepare"]
