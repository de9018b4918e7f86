"""Helpers for the training tests: tiny configs over the repo's tiny recipes, one thread."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and deterministically) on one thread on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(recipe: str, out_dir, *overrides: str):
    """A recipes/<recipe>.yaml config writing to `out_dir`, without tqdm, plus overrides."""
    from qwen3_fast.train.config import load_config

    return load_config(str(RECIPES / f"{recipe}.yaml"),
                       [f"output_dir={out_dir}", "progress=false", *overrides])


def metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, texts, field: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return str(path)


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
