"""The demo's report: ``<out>/report.md`` with matplotlib plots (``<out>/plots/*.png``) and
``<out>/figures.json`` (every figure the report states, for tests and for comparing runs).

Plots: loss curves per stage (each stage's metrics.jsonl), reward and entropy in the RL
stages, accuracy per stage (thinking vs non-thinking, and mode-following), the thinking-
budget curve, distillation vs RL (pass@1, pass@k, CPU-seconds) and speculative decoding.
The report checks the effects the Qwen3 recipe should show and says plainly when one did
not appear at this scale.
"""
from __future__ import annotations

import json
import math
import os

from qwen3_fast.demo.pipeline import DISTILL_ROUTE, RL_ROUTE, read_done


REWARD_MARGIN = 0.02  # mean reward, last third of the steps over the first third


def _metrics(out: str, name: str) -> list[dict]:
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r.get("step", len(xs) + 1))
            ys.append(float(v))
    return xs, ys


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str) -> str:
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    path = os.path.join("plots", name)
    fig.tight_layout()
    fig.savefig(os.path.join(out, path), dpi=90)
    _plt().close(fig)
    return path


def collect(out: str, names: list[str]) -> dict:
    """The figures of every finished stage, plus the comparisons the report makes."""
    stages = {}
    for name in names:
        d = read_done(out, name)
        if d is not None:
            stages[name] = d
    fig: dict = {"stages": {}, "checks": {}}
    for name, d in stages.items():
        f = d.get("figures") or {}
        entry = {k: d.get(k) for k in ("train_seconds", "train_cpu_seconds", "eval_seconds",
                                       "steps_run", "first_loss", "last_loss")}
        for k in ("acc_think", "acc_no_think", "acc_think_multi_step",
                  "acc_no_think_multi_step", "mode_following", "think_reply_tokens",
                  "per_level_think", "per_level_no_think", "eval_problems"):
            if k in f:
                entry[k] = f[k]
        filt = os.path.join(out, name, "rl_prompts_filtered.jsonl.json")
        if os.path.isfile(filt):  # stages.filter_rl_prompts
            with open(filt, encoding="utf-8") as fh:
                entry["prompt_filter"] = json.load(fh)
        rows = _metrics(out, name)
        losses = _series(rows, "loss")[1]
        if losses:
            entry["metrics_first_loss"], entry["metrics_last_loss"] = losses[0], losses[-1]
        rewards = _series(rows, "reward")[1]
        if rewards:
            k = max(1, len(rewards) // 3)
            entry["reward_first"] = sum(rewards[:k]) / k
            entry["reward_last"] = sum(rewards[-k:]) / k
        ent = _series(rows, "entropy")[1]
        if ent:
            entry["entropy_first"], entry["entropy_last"] = ent[0], ent[-1]
        fig["stages"][name] = entry
    final = stages.get("general_rl", {}).get("figures", {})
    if "budget_curve" in final:
        fig["budget_curve"] = final["budget_curve"]
    if "speculative" in final:
        fig["speculative"] = final["speculative"]

    def route(names_, teacher_gen=False):
        done = [stages[n] for n in names_ if n in stages]
        if len(done) != len(names_):
            return None
        last = done[-1]["figures"]
        return {"cpu_seconds": sum(d["train_cpu_seconds"] for d in done),
                "wall_seconds": sum(d["train_seconds"] for d in done),
                **{k: v for k, v in (last.get("pass_at_k") or {}).items()},
                "acc_think": last.get("acc_think"), "acc_no_think": last.get("acc_no_think")}

    comp = {"distillation": route(DISTILL_ROUTE), "rl": route(RL_ROUTE)}
    fig["student"] = comp
    _checks(fig)
    return fig


def _checks(fig: dict) -> None:
    """The effects the issue expects, each True/False (None: its stages did not run)."""
    s, c = fig["stages"], fig["checks"]
    post = [n for n in ("fusion", "general_rl") if n in s]
    if post:
        last = s[post[-1]]
        c["think_beats_no_think_multi_step"] = (last.get("acc_think_multi_step", 0)
                                                > last.get("acc_no_think_multi_step", 0))
        c["mode_following_ge_0.9"] = last.get("mode_following", 0) >= 0.9
    rl = [n for n in ("reasoning_rl", "general_rl", "student_rl") if "reward_first" in s.get(n, {})]
    # "raised" needs a visible margin (RL rewards at this scale are noisy)
    c["rl_raises_reward"] = {n: s[n]["reward_last"] > s[n]["reward_first"] + REWARD_MARGIN
                             for n in rl}
    d, r = fig["student"].get("distillation"), fig["student"].get("rl")
    if d and r and "pass@1" in d and "pass@1" in r:
        c["distillation_beats_rl_pass1"] = d["pass@1"] > r["pass@1"]
        c["distillation_cheaper"] = d["cpu_seconds"] < r["cpu_seconds"]
    if "speculative" in fig:
        c["speculative_speedup_gt_1"] = fig["speculative"]["speedup"] > 1.0


def plot_all(out: str, names: list[str], fig: dict) -> dict:
    """Write the plots; returns {title: relative path}."""
    plt = _plt()
    plots = {}
    trained = [n for n in names if _series(_metrics(out, n), "loss")[1]]
    if trained:
        cols = 4
        rows_n = (len(trained) + cols - 1) // cols
        f, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), squeeze=False)
        for ax, n in zip(axes.flat, trained):
            xs, ys = _series(_metrics(out, n), "loss")
            ax.plot(xs, ys)
            ax.set_title(n, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(trained):]:
            ax.axis("off")
        plots["Loss per stage"] = _save(f, out, "losses.png")
    rl = [n for n in names if _series(_metrics(out, n), "reward")[1]]
    if rl:
        f, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
        for n in rl:
            rows = _metrics(out, n)
            a1.plot(*_series(rows, "reward"), label=n, marker=".")
            a2.plot(*_series(rows, "entropy"), label=n, marker=".")
        a1.set_title("RL reward (mean per step)")
        a2.set_title("RL policy entropy (nats/token)")
        for a in (a1, a2):
            a.set_xlabel("step")
            a.legend(fontsize=7)
        plots["Reward and entropy in RL"] = _save(f, out, "rl.png")
    evald = [n for n in names if "acc_think" in fig["stages"].get(n, {})]
    if evald:
        f, ax = plt.subplots(figsize=(10, 3.4))
        x = range(len(evald))
        st = fig["stages"]
        ax.plot(x, [st[n]["acc_think"] for n in evald], "o-", label="thinking")
        ax.plot(x, [st[n]["acc_no_think"] for n in evald], "s-", label="non-thinking")
        ax.plot(x, [st[n]["mode_following"] for n in evald], "^--", label="mode-following")
        ax.set_xticks(list(x))
        ax.set_xticklabels(evald, rotation=30, fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Held-out accuracy and mode-following per stage")
        ax.legend(fontsize=8)
        plots["Accuracy per stage, think vs no-think"] = _save(f, out, "accuracy.png")
    if "budget_curve" in fig:
        bc = fig["budget_curve"]
        f, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([int(k) for k in bc], list(bc.values()), "o-")
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Thinking budget (final teacher)")
        plots["Thinking-budget curve"] = _save(f, out, "budget.png")
    d, r = fig["student"].get("distillation"), fig["student"].get("rl")
    if d and r:
        f, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        keys = [k for k in d if k.startswith("pass@")]
        w = 0.35
        for i, (lab, v) in enumerate((("distillation", d), ("RL", r))):
            a1.bar([j + i * w for j in range(len(keys))], [v.get(k, 0) for k in keys], w,
                   label=lab)
        a1.set_xticks([j + w / 2 for j in range(len(keys))])
        a1.set_xticklabels(keys)
        a1.set_ylim(0, 1.05)
        a1.legend(fontsize=8)
        a1.set_title("Student: pass@1 / pass@k")
        a2.bar(["distillation", "RL"], [d["cpu_seconds"], r["cpu_seconds"]])
        a2.set_title("Student: training CPU-seconds")
        plots["Distillation vs RL (student)"] = _save(f, out, "distill_vs_rl.png")
    if "speculative" in fig:
        sp = fig["speculative"]
        f, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        a1.bar(["acceptance"], [sp["acceptance_rate"]])
        a1.set_ylim(0, 1.05)
        a1.set_title("Draft acceptance rate")
        a2.bar(["plain int8", "QuantSpec"], [sp["plain_seconds"], sp["speculative_seconds"]])
        a2.set_title(f"Decode seconds (speedup {sp['speedup']:.2f}x)")
        plots["Self-speculative decoding"] = _save(f, out, "speculative.png")
    return plots


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def _distillation_account(fig: dict) -> str:
    """Why distillation may lose here, from the run's own figures: how good the teacher it
    copies is, and whether the gap is inside the evaluation's noise."""
    d, r = fig["student"].get("distillation") or {}, fig["student"].get("rl") or {}
    teacher = fig["stages"].get("general_rl", {})
    n = teacher.get("eval_problems") or 0
    if "pass@1" not in d or "pass@1" not in r or not n or teacher.get("acc_think") is None:
        return ""
    noise = 1 / math.sqrt(n)
    gap = r["pass@1"] - d["pass@1"]
    within = "inside" if gap <= noise else "outside"
    return (f" (pass@1 {_fmt(d['pass@1'])} vs {_fmt(r['pass@1'])}: a gap of {_fmt(gap)}, "
            f"{within} the +-{_fmt(noise)} a {n}-problem evaluation moves by; the teacher it "
            f"copies solves {_fmt(teacher['acc_think'])} of the problems itself in thinking mode, "
            "where Qwen3's distillation result rests on a far stronger teacher)")


def _verdicts(fig: dict) -> list[str]:
    c, lines = fig["checks"], []

    def say(key, good, bad):
        if key in c:
            lines.append(("- yes: " + good) if c[key] else ("- NO: " + bad))

    say("think_beats_no_think_multi_step",
        "thinking-mode accuracy beats non-thinking on the multi-step tasks (final teacher)",
        "thinking-mode accuracy did not beat non-thinking on the multi-step tasks at this "
        "scale/step count")
    say("mode_following_ge_0.9", "mode-following is at least 90% after fusion/general RL",
        "mode-following stayed under 90% after fusion/general RL")
    for n, ok in c.get("rl_raises_reward", {}).items():
        lines.append(f"- {'yes' if ok else 'NO'}: {n} "
                     f"{'raised' if ok else 'did not raise'} the mean reward (last third of its "
                     f"steps over the first third by more than {REWARD_MARGIN})")
    say("distillation_beats_rl_pass1", "the distilled student beats the RL-trained student "
        "(pass@1)", "the distilled student did not beat the RL-trained student on pass@1"
        + _distillation_account(fig))
    say("distillation_cheaper", "the distillation route used fewer CPU-seconds",
        "the distillation route used more CPU-seconds than the RL route")
    say("speculative_speedup_gt_1", "self-speculative decoding was faster than plain int8 "
        "decoding", "self-speculative decoding was not faster than plain int8 decoding here "
        "(tiny models: the draft costs as much as the target; see the acceptance rate)")
    return lines


def write_report(out: str, stages, settings: dict, moe: bool = False, quick: bool = False
                 ) -> str:
    """Write figures.json, the plots and report.md; returns the report's path."""
    names = [s.name for s in stages if s.name != "data"]
    fig = collect(out, names)
    fig["run"] = {"quick": quick, "moe": moe, "settings": {k: v for k, v in settings.items()
                                                          if k != "sizes"}}
    plots = plot_all(out, names, fig)
    fig["plots"] = plots
    with open(os.path.join(out, "figures.json"), "w", encoding="utf-8") as f:
        json.dump(fig, f, indent=1)
    L = [f"# qwen3_fast demo: the Qwen3 recipe at tiny scale{' (MoE teacher)' if moe else ''}"
         f"{' (--quick)' if quick else ''}", "",
         "Every stage ran through the package's own recipes (`qwen3-fast train ...`); configs "
         "in `configs/`, models in `<stage>/model` (`qwen3-fast chat --model <stage>/model`).",
         "", "## What the recipe should show, and what it showed", ""]
    L += _verdicts(fig) or ["- (no checks: the stages they need did not run)"]
    L += ["", "## Per stage", "",
          "| stage | train s | CPU-s | loss first -> last | acc think | acc no-think | "
          "multi-step think / no-think | mode-following | reward first -> last | "
          "entropy first -> last |",
          "|---" * 10 + "|"]
    for n in names:
        e = fig["stages"].get(n)
        if e is None:
            L.append(f"| {n} | not run |" + " |" * 8)
            continue
        L.append("| " + " | ".join([
            n, _fmt(e.get("train_seconds")), _fmt(e.get("train_cpu_seconds")),
            f"{_fmt(e.get('metrics_first_loss'))} -> {_fmt(e.get('metrics_last_loss'))}",
            _fmt(e.get("acc_think")), _fmt(e.get("acc_no_think")),
            f"{_fmt(e.get('acc_think_multi_step'))} / {_fmt(e.get('acc_no_think_multi_step'))}",
            _fmt(e.get("mode_following")),
            f"{_fmt(e.get('reward_first'))} -> {_fmt(e.get('reward_last'))}",
            f"{_fmt(e.get('entropy_first'))} -> {_fmt(e.get('entropy_last'))}"]) + " |")
    evald = [n for n in names if "per_level_think" in fig["stages"].get(n, {})]
    if evald:
        n_eval = fig["stages"][evald[-1]].get("eval_problems")
        L += ["", "## Accuracy by difficulty level", "",
              f"Greedy accuracy on the first {n_eval} held-out problems (both difficulty "
              f"levels of every task in equal parts; level 2 is the harder one); one "
              f"accuracy moves by about +-{_fmt(1 / math.sqrt(max(n_eval or 1, 1)))} between "
              f"runs at this size.", "",
              "| stage | think level 1 | think level 2 | no-think level 1 | no-think level 2 |",
              "|---|---|---|---|---|"]
        for n in evald:
            e = fig["stages"][n]
            t, p = e.get("per_level_think", {}), e.get("per_level_no_think", {})
            L.append(f"| {n} | {_fmt(t.get('1'))} | {_fmt(t.get('2'))} | {_fmt(p.get('1'))} | "
                     f"{_fmt(p.get('2'))} |")
    filt = [n for n in names if "prompt_filter" in fig["stages"].get(n, {})]
    if filt:
        L += ["", "## RL prompt filtering", "",
              "Before each reasoning-RL stage its starting policy answers k sampled replies "
              "to each candidate prompt; RL keeps the prompts it solves sometimes but not "
              "always (a GRPO group with a nonzero advantage), as Qwen3's query filtering.",
              "", "| stage | candidates | k | prompts by correct replies (0..k) | "
              "candidate pass rate | kept (of them mixed) |", "|---|---|---|---|---|---|"]
        for n in filt:
            pf = fig["stages"][n]["prompt_filter"]
            L.append(f"| {n} | {pf['candidates']} | {pf['k']} | "
                     f"{' / '.join(map(str, pf['pass_histogram']))} | "
                     f"{_fmt(pf['candidate_pass_rate'])} | {pf['kept']} ({pf['mixed']}) |")
    L += ["", "## Student: distillation vs RL", "",
          "Both routes start from the same `student_base`; CPU-seconds are the routes' "
          "training (distillation includes the teacher's generation and scoring, RL its "
          "prompt filtering). pass@1 and pass@k: k sampled thinking replies (temperature "
          "0.6) to each of the held-out problems counted in the table.", "",
          "| route | CPU-s | wall s | problems | pass@1 | pass@k | acc think | acc no-think |",
          "|---|---|---|---|---|---|---|---|"]
    for lab, key in (("distillation (off_policy -> on_policy)", "distillation"),
                     ("RL (student_cold_start -> student_rl)", "rl")):
        v = fig["student"].get(key)
        if not v:
            continue
        pk = [k for k in v if k.startswith("pass@") and k != "pass@1"]
        L.append(f"| {lab} | {_fmt(v.get('cpu_seconds'))} | {_fmt(v.get('wall_seconds'))} | "
                 f"{v.get('problems', '-')} | {_fmt(v.get('pass@1'))} | "
                 f"{(pk[0] + ' ' + _fmt(v[pk[0]])) if pk else '-'} | "
                 f"{_fmt(v.get('acc_think'))} | {_fmt(v.get('acc_no_think'))} |")
    if "budget_curve" in fig:
        L += ["", "## Thinking budget (final teacher)", "", "| budget | accuracy |", "|---|---|"]
        L += [f"| {k} | {_fmt(v)} |" for k, v in fig["budget_curve"].items()]
    if "speculative" in fig:
        L += ["", "## Self-speculative decoding (final teacher, QuantSpec)", "",
              "| figure | value |", "|---|---|"]
        L += [f"| {k} | {_fmt(v)} |" for k, v in fig["speculative"].items()]
    L += ["", "## Plots", ""]
    for title, path in plots.items():
        L += [f"### {title}", "", f"![{title}]({path})", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")
    return path


__all__ = ["collect", "plot_all", "write_report"]
