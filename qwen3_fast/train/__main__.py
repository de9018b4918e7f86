"""``python -m qwen3_fast.train`` / ``torchrun --nproc-per-node N -m qwen3_fast.train``.

    python -m qwen3_fast.train --config recipes/s1_tiny.yaml steps=20 optim.lr=1e-3
    python -m qwen3_fast.train sft --config recipes/sft_cold_start_tiny.yaml
    torchrun --nproc-per-node 2 -m qwen3_fast.train --config recipes/s1_tiny.yaml

Same arguments as ``qwen3-fast train <recipe>``: an optional recipe name (pretrain, sft,
grpo, distill; train/recipes.py; default pretrain), ``--config FILE`` then ``key=value``
overrides (dotted keys into the stage's dataclass, train/config.py).
"""
from __future__ import annotations

import argparse
import sys

from qwen3_fast.train.recipes import RECIPES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML config file (its `stage:` picks the stage)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted-key overrides, e.g. optim.lr=3e-4 data.seq_len=2048")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    return parser


def build_parser(prog: str = "python -m qwen3_fast.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Qwen3 training stages. Optional first argument: the recipe ("
        + ", ".join(RECIPES) + "; default pretrain)")
    return add_arguments(parser)


def run(args) -> int:
    import yaml

    from qwen3_fast.train.config import ConfigError, load_config, to_dict
    from qwen3_fast.train.recipes import recipe_module

    recipe = getattr(args, "train_command", None) or "pretrain"
    module = recipe_module(recipe)
    try:
        cfg = load_config(args.config, args.overrides, stages=module.STAGES)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from qwen3_fast.train.distributed import init_distributed, shutdown

    env = init_distributed(cfg.device)
    try:
        losses = module.run(cfg, env)
    finally:
        shutdown(env)
    if env.is_main and losses:
        print(f"done: {recipe} {cfg.stage}, {len(losses)} steps, last loss {losses[-1]:.4f}; "
              f"model in {cfg.output_dir}/model")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argv.pop(0) if argv and argv[0] in RECIPES else "pretrain"
    args = build_parser().parse_args(argv)
    args.train_command = recipe
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
