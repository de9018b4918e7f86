"""The demo's data files (contract formats, docs/contracts) and its tokenizer.

    pretrain_general.jsonl    {"text"}: questions with direct answers, short stories (S1)
    pretrain_reasoning.jsonl  {"text"}: questions with worked step-by-step solutions (S2)
    pretrain_long.jsonl       {"text"}: long documents of many worked problems (S3)
    sft_think.jsonl           {"messages"}: assistant turns with reasoning_content (cold start)
    sft_no_think.jsonl        {"messages"}: direct answers, empty reasoning (fusion)
    rl_prompts.jsonl          {"messages", "answer", "task", "enable_thinking"} (GRPO,
                              distillation prompts)
    eval.jsonl                held-out RL records (another seed; excluded from all training)

Every file holds both difficulty levels of every task in equal parts (tasks.py).

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a sample of all
of the above (rendered in the chat format), carrying the 26 Qwen3 added tokens
(qwen3_fast.tokenizer_train.train_qwen_bpe); digits stay single tokens (Qwen's split regex).
"""
from __future__ import annotations

import json
import os
import random

from qwen3_fast.chat_format import render_chat
from qwen3_fast.demo.tasks import LEVELS, Problem, problems as _problems

EVAL_SEED = 999_983


def problems(n: int, seed: int, exclude=None) -> list[Problem]:
    """Every data file mixes the difficulty levels evenly (tasks.py docstring)."""
    return _problems(n, seed, exclude=exclude, levels=LEVELS)


def _worked(p: Problem) -> str:
    return f"Question: {p.question}\nLet me think step by step.\n{p.reasoning}\nAnswer: {p.answer}"


def _direct(p: Problem) -> str:
    return f"Question: {p.question}\nAnswer: {p.answer}"


def general_texts(n: int, seed: int, exclude=None) -> list[str]:
    """Short documents: a few direct question/answer pairs each (no worked steps)."""
    ps = problems(3 * n, seed, exclude=exclude)
    return ["\n\n".join(_direct(p) for p in ps[3 * i:3 * i + 3]) for i in range(n)]


def reasoning_texts(n: int, seed: int, exclude=None) -> list[str]:
    """One worked problem per document."""
    return [_worked(p) for p in problems(n, seed, exclude=exclude)]


def long_texts(n: int, seed: int, per_doc: tuple = (1, 6), exclude=None) -> list[str]:
    """Long documents: `per_doc` (min, max) worked problems each, for the S3 length mix."""
    rng = random.Random(seed)
    counts = [rng.randint(*per_doc) for _ in range(n)]
    ps = problems(sum(counts), seed + 1, exclude=exclude)
    out, k = [], 0
    for c in counts:
        out.append("\n\n".join(_worked(p) for p in ps[k:k + c]))
        k += c
    return out


def think_sample(p: Problem) -> dict:
    return {"messages": [{"role": "user", "content": p.question},
                         {"role": "assistant", "content": p.answer,
                          "reasoning_content": p.reasoning}]}


def no_think_sample(p: Problem) -> dict:
    """A non-thinking answer: empty reasoning, rendered with the empty think block."""
    return {"messages": [{"role": "user", "content": p.question},
                         {"role": "assistant", "content": p.answer, "reasoning_content": ""}]}


def _write_jsonl(path: str, records) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def eval_problems(n: int) -> list[Problem]:
    return problems(n, EVAL_SEED)


def write_data(data_dir: str, sizes: dict, seed: int = 0) -> dict:
    """Write every data file into `data_dir`; returns {name: path}. `sizes` gives the record
    counts: general, reasoning, long, sft, rl, eval. The eval questions never appear in
    any training file."""
    os.makedirs(data_dir, exist_ok=True)
    held_out = {p.question for p in eval_problems(sizes["eval"])}
    files = {
        "general": [{"text": t} for t in general_texts(sizes["general"], seed + 1, held_out)],
        "reasoning": [{"text": t} for t in reasoning_texts(sizes["reasoning"], seed + 2,
                                                           held_out)],
        "long": [{"text": t} for t in long_texts(sizes["long"], seed + 3, exclude=held_out)],
        "sft_think": [think_sample(p) for p in problems(sizes["sft"], seed + 4,
                                                       exclude=held_out)],
        "sft_no_think": [no_think_sample(p) for p in problems(sizes["sft"], seed + 5,
                                                              exclude=held_out)],
        "rl_prompts": [p.rl_record() for p in problems(sizes["rl"], seed + 6,
                                                       exclude=held_out)],
        "eval": [p.rl_record() for p in eval_problems(sizes["eval"])],
    }
    names = {"general": "pretrain_general", "reasoning": "pretrain_reasoning",
             "long": "pretrain_long"}
    paths = {}
    for key, records in files.items():
        paths[key] = os.path.join(data_dir, names.get(key, key) + ".jsonl")
        _write_jsonl(paths[key], records)
    return paths


def tokenizer_corpus(seed: int = 0, n: int = 600) -> list[str]:
    """What the BPE is trained on: pre-training texts and chats rendered both ways."""
    ps = problems(n, seed + 7)
    texts = [_worked(p) for p in ps] + [_direct(p) for p in ps[: n // 2]]
    texts += [render_chat(think_sample(p)["messages"]) for p in ps[: n // 2]]
    texts += [render_chat(no_think_sample(p)["messages"]) for p in ps[n // 2:]]
    return texts


def build_tokenizer(save_dir: str, vocab_size: int = 384, seed: int = 0):
    """Train the demo BPE and save it (tokenizer.json + tokenizer_config.json) to
    `save_dir`; returns the Qwen3Tokenizer. Deterministic for a seed."""
    from qwen3_fast.tokenizer_train import build_test_tokenizer

    return build_test_tokenizer(tokenizer_corpus(seed), vocab_size=vocab_size,
                                save_dir=save_dir)


__all__ = ["EVAL_SEED", "build_tokenizer", "eval_problems", "general_texts", "long_texts",
           "no_think_sample", "reasoning_texts", "think_sample", "tokenizer_corpus", "write_data"]
