"""``python -m qwen3_fast.demo [--out DIR] [--quick] [--moe]`` (see qwen3_fast/demo/__init__.py)."""
import sys

from qwen3_fast.demo import main

if __name__ == "__main__":
    sys.exit(main())
