"""``qwen3-fast demo``: the whole Qwen3 recipe at tiny scale on a CPU, then a report.

    qwen3-fast demo                      # default run (runs/demo), <= ~15 min on 2 cores
    qwen3-fast demo --quick --out /tmp/d # ~2 minutes: fewer steps, smaller models and eval
    qwen3-fast demo --moe                # the teacher is a Qwen3 MoE model
    python -m qwen3_fast.demo --quick    # the same without the console script
    qwen3-fast chat --model runs/demo/general_rl/model   # talk to the final teacher

Synthetic verifiable tasks (demo/tasks.py) and their data files and BPE tokenizer
(demo/data.py); the stages, each run through the package's own training recipes
(demo/stages.py, demo/pipeline.py: S1, S2, S3 pre-training, long-CoT cold start, reasoning
RL, thinking-mode fusion, general RL; a smaller student distilled off-policy then on-policy
from the final teacher, against the same student trained by RL directly); evaluation after
each stage (demo/evaluate.py) and ``<out>/report.md`` with plots and ``<out>/figures.json``
(demo/report.py). Rerunning the command resumes: finished stages are skipped.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="runs/demo", help="output directory (default "
                        "runs/demo); rerunning with the same --out resumes")
    parser.add_argument("--quick", action="store_true",
                        help="a ~2 minute run: fewer steps, smaller models, smaller eval")
    parser.add_argument("--moe", action="store_true",
                        help="the teacher is a Qwen3 MoE model (routed experts)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args) -> int:
    import os
    import time

    from qwen3_fast.demo.pipeline import run_stages
    from qwen3_fast.demo.report import write_report
    from qwen3_fast.demo.stages import build_stages

    os.makedirs(args.out, exist_ok=True)
    settings_file = os.path.join(args.out, "demo_args.txt")
    mode = f"quick={args.quick} moe={args.moe} seed={args.seed}"
    if os.path.isfile(settings_file):
        with open(settings_file) as f:
            before = f.read().strip()
        if before != mode:
            print(f"{args.out} holds a demo run with {before}; this one is {mode}. Use another "
                  "--out (or delete it) to start over.", file=sys.stderr)
            return 2
    else:
        with open(settings_file, "w") as f:
            f.write(mode + "\n")
    stages, settings = build_stages(args.out, quick=args.quick, moe=args.moe, seed=args.seed)
    t0 = time.perf_counter()
    rc = run_stages(args.out, stages)
    if rc != 0:
        return rc
    path = write_report(args.out, stages, settings, moe=args.moe, quick=args.quick)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; report: {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3_fast.demo",
                                     description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))


__all__ = ["add_arguments", "main", "run"]
