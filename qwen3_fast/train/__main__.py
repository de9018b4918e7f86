"""``python -m qwen3_fast.train`` / ``torchrun --nproc-per-node N -m qwen3_fast.train``.

    python -m qwen3_fast.train --config recipes/s1_tiny.yaml steps=20 optim.lr=1e-3
    torchrun --nproc-per-node 2 -m qwen3_fast.train --config recipes/s1_tiny.yaml

Same arguments as ``qwen3-fast train pretrain``: ``--config FILE`` then ``key=value``
overrides (dotted keys into the stage's dataclass, train/config.py).
"""
from __future__ import annotations

import argparse
import sys


def build_parser(prog: str = "python -m qwen3_fast.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Qwen3 pre-training (S1/S2/S3)")
    parser.add_argument("--config", help="YAML config file (stage: s1 | s2 | s3)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted-key overrides, e.g. optim.lr=3e-4 data.seq_len=2048")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    return parser


def run(args) -> int:
    import yaml

    from qwen3_fast.train.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from qwen3_fast.train.distributed import init_distributed, shutdown
    from qwen3_fast.train.trainer import train

    env = init_distributed(cfg.device)
    try:
        losses = train(cfg, env)
    finally:
        shutdown(env)
    if env.is_main and losses:
        print(f"done: {len(losses)} steps, last loss {losses[-1]:.4f}; "
              f"checkpoints in {cfg.output_dir}/checkpoints")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
