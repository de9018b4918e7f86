"""Thinking-mode fusion data (Qwen3 post-training stage 3): one mix that teaches a single
model both modes and the soft switches.

:func:`build_fusion_samples` turns a pool of thinking samples (the final assistant turn has
reasoning) and a pool of non-thinking samples (final answer without reasoning) into chat
samples (``{"messages": [...], "mode": "think"|"no_think", "kind": ...}``) of four kinds:

    think_flag      a thinking sample, " /think" appended to its last user turn
    think_default   a thinking sample with no flag (thinking is the default mode)
    no_think        a non-thinking sample, " /no_think" appended to its last user turn; its
                    reply has an EMPTY reasoning, which the chat format renders as the
                    empty block ``<think>\\n\\n</think>\\n\\n`` before the answer
    multi_turn      2..max_turns single-turn exchanges chained into one conversation; each
                    user turn gets a random flag (/think, /no_think or none) and each reply
                    follows the LAST flag given so far (none yet: thinking), so the final
                    answer's mode is the last flag's

The kinds come in exact proportions (``ratios``, normalized; counts by largest remainder,
then shuffled). Each pool is drawn in a seeded shuffled order and reshuffled when used up,
so every sample is used about equally. Flags already present in the inputs are removed
first, so the only flags are the ones this builder places (at the end of the user text,
after a space, as in the Qwen3 report's examples). Everything is seeded by ``seed``.

:func:`write_jsonl` writes a mix for ``data.sources`` of a fusion config (train/sft.py):

    python -m qwen3_fast.train.fusion --thinking think.jsonl --non-thinking plain.jsonl \\
        --out fusion_mix.jsonl --seed 0 [--num-samples N] [--ratios 0.25,0.2,0.35,0.2]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from typing import Iterable, Optional, Sequence

from qwen3_fast import chat_format

THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"
KINDS = ("think_flag", "think_default", "no_think", "multi_turn")
DEFAULT_RATIOS = {"think_flag": 0.25, "think_default": 0.2, "no_think": 0.35,
                  "multi_turn": 0.2}
_FLAG_RE = re.compile(r"[ \t]*(?<!\S)/(?:no_)?think(?!\S)")


def strip_flags(text: str) -> str:
    """`text` without /think and /no_think words (and the blanks before them)."""
    return _FLAG_RE.sub("", text).strip()


def last_flag_mode(messages: Sequence[dict]) -> str:
    """"think" or "no_think": the mode the LAST flag in the user turns asks for ("think"
    when no user turn has a flag: thinking is the default)."""
    mode = "think"
    for m in messages:
        if m.get("role") == "user":
            for match in re.finditer(r"(?<!\S)/(no_)?think(?!\S)", m.get("content") or ""):
                mode = "no_think" if match.group(1) else "think"
    return mode


def _exchange(sample: dict, thinking: bool, where: str) -> list[dict]:
    """A sample's conversation, checked and normalized: flags stripped from user turns, the
    final reply's reasoning split into ``reasoning_content`` (empty for non-thinking)."""
    messages = sample["messages"] if isinstance(sample, dict) else sample
    chat_format.validate_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant reply")
    out = copy.deepcopy(list(messages))
    for m in out:
        if m["role"] == "user" and m.get("content"):
            m["content"] = strip_flags(m["content"])
    # the renderer's own split (reasoning_content, or a <think> block inside the content),
    # so the builder sees exactly the reasoning that render_chat would show
    reasoning, content = chat_format._split_reasoning(out[-1])
    reasoning = (reasoning or "").strip("\n")
    if thinking and not reasoning.strip():
        raise ValueError(f"{where}: a thinking sample needs reasoning in its final reply")
    out[-1] = {**out[-1], "content": content, "reasoning_content": reasoning if thinking else ""}
    return out


def _add_flag(messages: list[dict], flag: Optional[str]) -> None:
    if flag is None:
        return
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = f"{m['content']} {flag}" if m.get("content") else flag
            return


class _Pool:
    """Samples drawn in a seeded shuffled order, reshuffled each pass."""

    def __init__(self, samples: list, thinking: bool, rng: random.Random, name: str):
        if not samples:
            raise ValueError(f"{name}: expected at least one sample")
        self.samples = [_exchange(s, thinking, f"{name}[{i}]") for i, s in enumerate(samples)]
        self.rng = rng
        self.order: list[int] = []

    def draw(self) -> list[dict]:
        if not self.order:
            self.order = list(range(len(self.samples)))
            self.rng.shuffle(self.order)
        return copy.deepcopy(self.samples[self.order.pop()])


def _counts(n: int, ratios: dict) -> dict:
    total = sum(ratios.values())
    exact = {k: n * ratios[k] / total for k in KINDS}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(KINDS, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _multi_turn(think: _Pool, no_think: _Pool, rng: random.Random, max_turns: int,
                flag_probs: Sequence[float]) -> list[dict]:
    turns = rng.randint(2, max_turns)
    messages: list[dict] = []
    mode = "think"
    for t in range(turns):
        flag = rng.choices((THINK_FLAG, NO_THINK_FLAG, None), weights=flag_probs)[0]
        if flag is not None:
            mode = "think" if flag == THINK_FLAG else "no_think"
        ex = (think if mode == "think" else no_think).draw()
        if t > 0:  # the history keeps the first exchange's system prompt only
            ex = [m for m in ex if m["role"] != "system"]
        # the flag goes on the exchange's LAST user turn (the one its reply answers); a
        # multi-turn input keeps its earlier turns, unflagged, as context
        _add_flag(ex, flag)
        messages.extend(ex)
    return messages


def build_fusion_samples(thinking_samples: Sequence, non_thinking_samples: Sequence,
                         seed: int = 0, num_samples: Optional[int] = None,
                         ratios: Optional[dict] = None, max_turns: int = 3,
                         flag_probs: Sequence[float] = (0.4, 0.4, 0.2)) -> list[dict]:
    """The fusion mix.

    Parameters
    ----------
    thinking_samples, non_thinking_samples : chat samples (``{"messages": [...]}`` or the
        message lists) ending with an assistant reply; thinking ones need reasoning
        (``reasoning_content`` or a ``<think>`` block in the content), non-thinking ones
        have theirs dropped
    seed : seeds every random choice
    num_samples : size of the mix (default: the two pools' sizes added)
    ratios : {kind: weight} over KINDS (missing kinds: 0), normalized; default DEFAULT_RATIOS
    max_turns : multi-turn samples have 2..max_turns exchanges
    flag_probs : probabilities of (/think, /no_think, no flag) for each multi-turn user turn

    Returns
    -------
    list of {"messages": [...], "mode": "think"|"no_think", "kind": str}; ``mode`` is the
    final reply's mode (= the last flag's, thinking without one).
    """
    ratios = dict(DEFAULT_RATIOS if ratios is None else ratios)
    unknown = set(ratios) - set(KINDS)
    if unknown or any(v < 0 for v in ratios.values()) or not sum(ratios.values()) > 0:
        raise ValueError(f"ratios: expected non-negative weights over {KINDS} with a positive "
                         f"sum, got {ratios}")
    ratios = {k: float(ratios.get(k, 0.0)) for k in KINDS}
    if max_turns < 2:
        raise ValueError(f"max_turns: expected >= 2, got {max_turns}")
    if len(flag_probs) != 3 or min(flag_probs) < 0 or not sum(flag_probs) > 0:
        raise ValueError(f"flag_probs: expected 3 non-negative weights, got {flag_probs}")
    rng = random.Random(seed)
    think = _Pool(list(thinking_samples), True, random.Random(rng.random()), "thinking_samples")
    plain = _Pool(list(non_thinking_samples), False, random.Random(rng.random()),
                  "non_thinking_samples")
    n = len(think.samples) + len(plain.samples) if num_samples is None else num_samples
    if n < 0:
        raise ValueError(f"num_samples: expected >= 0, got {n}")
    kinds = [k for k, c in _counts(n, ratios).items() for _ in range(c)]
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        if kind == "multi_turn":
            messages = _multi_turn(think, plain, rng, max_turns, flag_probs)
        elif kind == "no_think":
            messages = plain.draw()
            _add_flag(messages, NO_THINK_FLAG)
        else:
            messages = think.draw()
            _add_flag(messages, THINK_FLAG if kind == "think_flag" else None)
        out.append({"messages": messages, "mode": last_flag_mode(messages), "kind": kind})
    return out


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(samples: Iterable[dict], path: str) -> int:
    """Write samples one JSON object per line (UTF-8); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_fast.train.fusion",
                                description="Build a thinking-mode fusion SFT mix (JSONL).")
    p.add_argument("--thinking", required=True, help="JSONL of thinking chat samples")
    p.add_argument("--non-thinking", required=True, help="JSONL of non-thinking chat samples")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--ratios", default=None,
                   help="think_flag,think_default,no_think,multi_turn weights, e.g. 1,1,2,1")
    p.add_argument("--max-turns", type=int, default=3)
    args = p.parse_args(argv)
    ratios = None
    if args.ratios:
        ratios = dict(zip(KINDS, (float(x) for x in args.ratios.split(","))))
    mix = build_fusion_samples(read_jsonl(args.thinking), read_jsonl(args.non_thinking),
                               args.seed, args.num_samples, ratios, args.max_turns)
    n = write_jsonl(mix, args.out)
    print(f"wrote {n} samples to {args.out}")
    return 0


__all__ = ["DEFAULT_RATIOS", "KINDS", "NO_THINK_FLAG", "THINK_FLAG", "build_fusion_samples",
           "last_flag_mode", "read_jsonl", "strip_flags", "write_jsonl"]


if __name__ == "__main__":
    sys.exit(main())

