"""The ``qwen3-fast`` command line.

Subcommands:
  info       what was built and which backend each op uses (= python -m qwen3_fast.info)
  bench-ops  a one-line-per-op speed check of the kernels against the reference (HF math)
             at a Qwen3-8B layer shape; the full suite is ``pytest bench/ --benchmark-only``
  generate   one reply to --prompt (streams; --json for a JSON result)  [generate/cli.py]
  chat       interactive chat with /think and /no_think toggles           [generate/cli.py]
  train      ``train {pretrain,sft,grpo,distill} --config FILE [key=value ...]``: the
             training recipes (= python -m qwen3_fast.train; torchrun for several ranks)
                                                                          [train/recipes.py]
  demo       ``demo [--out DIR] [--quick] [--moe]``: the whole Qwen3 recipe at tiny scale on
             a CPU, with a report (= python -m qwen3_fast.demo)            [demo/]
"""
from __future__ import annotations

import argparse
import sys
import time


def _median_seconds(fn, *args, repeats: int = 7) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_ops(tokens: int, hidden: int, inter: int) -> int:
    import torch

    from qwen3_fast import ops
    from qwen3_fast.ops import reference

    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, dtype=dt)
    r = torch.randn(tokens, hidden, dtype=dt)
    w = torch.randn(hidden, dtype=dt)
    gu = torch.randn(tokens, 2 * inter, dtype=dt)
    cases = [
        ("rms_norm", ops.rms_norm, lambda *a: reference.rms_norm(*a, 1e-6), (x, w), f"[{tokens}, {hidden}]"),
        ("add_rms_norm", ops.add_rms_norm, lambda *a: reference.add_rms_norm(*a, 1e-6), (x, r, w),
         f"[{tokens}, {hidden}]"),
        ("silu_and_mul", ops.silu_and_mul, reference.silu_and_mul, (gu,), f"[{tokens}, {2 * inter}]"),
    ]
    print(f"bf16 forward on {x.device}, {torch.get_num_threads()} threads; median of 7")
    with torch.no_grad():
        for name, fast, ref, args, shape in cases:
            t_fast, t_ref = _median_seconds(fast, *args), _median_seconds(ref, *args)
            print(f"{name:<14}{shape:<16} qwen3_fast {t_fast * 1e3:8.2f} ms   reference {t_ref * 1e3:8.2f} ms"
                  f"   speedup {t_ref / t_fast:5.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen3-fast", description="qwen3_fast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what was built and which backend each op uses")
    p_info.add_argument("--json", action="store_true")
    p_bench = sub.add_parser("bench-ops", help="quick kernel-vs-reference speed check")
    p_bench.add_argument("--tokens", type=int, default=4096)
    p_bench.add_argument("--hidden", type=int, default=4096)
    p_bench.add_argument("--intermediate", type=int, default=12288)
    from qwen3_fast.generate import cli as generate_cli  # generate / chat (argparse only)

    generate_cli.add_subcommands(sub)
    from qwen3_fast.train.__main__ import add_arguments as add_train_arguments
    from qwen3_fast.train.recipes import RECIPES

    p_train = sub.add_parser("train", help="training stages: " + ", ".join(RECIPES))
    train_sub = p_train.add_subparsers(dest="train_command", required=True)
    for recipe, (_, helptext) in RECIPES.items():
        add_train_arguments(train_sub.add_parser(recipe, help=helptext))
    from qwen3_fast.demo import add_arguments as add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="the Qwen3 recipe end to end at tiny "
                                      "scale on a CPU (report in --out)"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        from qwen3_fast.demo import run as demo_run

        return demo_run(args)
    if args.command == "train":
        from qwen3_fast.train.__main__ import run as train_run

        return train_run(args)
    if args.command in ("generate", "chat"):
        return generate_cli.main(args)
    if args.command == "info":
        from qwen3_fast import info

        return info.main(["--json"] if args.json else [])
    if args.command == "bench-ops":
        for name in ("tokens", "hidden", "intermediate"):
            if getattr(args, name) <= 0:
                parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
        return bench_ops(args.tokens, args.hidden, args.intermediate)
    return 2


if __name__ == "__main__":
    sys.exit(main())
