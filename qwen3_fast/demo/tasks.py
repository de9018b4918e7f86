"""Synthetic, verifiable tasks for the demo, generated on the fly from a seed.

Every task yields a :class:`Problem`: the user question, a step-by-step solution (the long
chain of thought that becomes ``reasoning_content``) and the final answer (the reply's
``content``). :func:`verify` checks a model's reply against the reference answer.

The tasks are chosen so that thinking really helps a tiny model: the direct answer of a
sum of five digits or of a three-step word problem needs the whole computation in one
token, while every line of the worked solution is one small, learnable step (a running sum,
a running count, one carry, one comparison).

    task       question                                    steps in the solution
    sum        What is 3 + 8 + 5 + 9 + 2?                  running sums, one per line
    add        What is 457 + 389?                          column by column with carries
    count      How many times does a appear in: b a c a?   running count per letter
    sort       Sort in ascending order: 7 2 9 4            pick the smallest, repeat
    convert    How many m are 3 km and 250 m?              unit product, then the sum
    word       Tom has 5 apples. He buys 3 ... now?        one line per event

Answers are plain numbers (or a space-separated list for ``sort``); the verifier reads the
last number (or all numbers, for sort) of the reply's content, so "The answer is 26." and
"26" both count.

Difficulty levels (``level``): 2 is the table above; 1 is the same task with fewer steps and
smaller numbers (3-4 digits to sum, two-digit addends, 4-5 letters, 3-4 numbers under 10 to
sort, unit extras under 10, one or two events). The demo trains and evaluates on an even mix
of both (a curriculum within each batch): the tiny models learn the step formats on the short
instances first, and RL finds prompts at every stage that the policy solves only sometimes.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

TASKS = ("sum", "add", "count", "sort", "convert", "word")
# The tasks the think-vs-no-think comparison is about (several dependent steps each).
MULTI_STEP_TASKS = ("sum", "count", "word")


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    reasoning: str  # step-by-step solution (reasoning_content of a thinking reply)
    answer: str  # the reference answer, also the reply content
    level: int = 2  # difficulty (module docstring)

    def rl_record(self, enable_thinking: bool = True) -> dict:
        """The contract's RL prompt record (GRPO, distillation prompt sets, eval)."""
        return {"messages": [{"role": "user", "content": self.question}],
                "answer": self.answer, "task": self.task, "level": self.level,
                "enable_thinking": enable_thinking}


LEVELS = (1, 2)


def _sum(rng: random.Random, level: int = 2) -> Problem:
    nums = [rng.randint(1, 9) for _ in range(rng.randint(*((3, 4) if level == 1 else (4, 6))))]
    steps, total = [], nums[0]
    for x in nums[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    return Problem("sum", "What is " + " + ".join(map(str, nums)) + "?", "\n".join(steps),
                   str(total))


def _add(rng: random.Random, level: int = 2) -> Problem:
    hi = 99 if level == 1 else 999
    a, b = rng.randint(10, hi), rng.randint(10, hi)
    da, db = str(a)[::-1], str(b)[::-1]
    names = ("ones", "tens", "hundreds", "thousands")
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{names[i]}: {x} + {y} + {carry} = {s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        steps.append(f"{names[len(steps)]}: write {carry}")
    steps.append(f"so {a} + {b} = {a + b}")
    return Problem("add", f"What is {a} + {b}?", "\n".join(steps), str(a + b))


_LETTERS = "abcde"


def _count(rng: random.Random, level: int = 2) -> Problem:
    letters = [rng.choice(_LETTERS)
               for _ in range(rng.randint(*((4, 5) if level == 1 else (5, 8))))]
    target = rng.choice(letters)
    steps, n = [], 0
    for c in letters:
        if c == target:
            n += 1
            steps.append(f"{c} is {target}: {n}")
        else:
            steps.append(f"{c} is not {target}: {n}")
    return Problem("count", f"How many times does {target} appear in: {' '.join(letters)}?",
                   "\n".join(steps), str(n))


def _sort(rng: random.Random, level: int = 2) -> Problem:
    nums = (rng.sample(range(1, 10), rng.randint(3, 4)) if level == 1
            else rng.sample(range(1, 20), rng.randint(4, 5)))
    rest, steps, out = list(nums), [], []
    while rest:
        m = min(rest)
        steps.append(f"smallest of {' '.join(map(str, rest))} is {m}")
        rest.remove(m)
        out.append(m)
    return Problem("sort", "Sort in ascending order: " + " ".join(map(str, nums)),
                   "\n".join(steps), " ".join(map(str, out)))


_UNITS = (("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("dozen", "eggs", 12))


def _convert(rng: random.Random, level: int = 2) -> Problem:
    big, small, factor = rng.choice(_UNITS)
    n, extra = rng.randint(1, 9), rng.randint(1, (min(factor, 10) if level == 1 else factor) - 1)
    prod = n * factor
    steps = [f"1 {big} is {factor} {small}", f"{n} {big} is {n} x {factor} = {prod} {small}",
             f"{prod} + {extra} = {prod + extra}"]
    return Problem("convert", f"How many {small} are {n} {big} and {extra} {small}?",
                   "\n".join(steps), str(prod + extra))


_NAMES = ("Tom", "Ann", "Sam", "Mia", "Leo", "Eva")
_THINGS = ("apples", "books", "coins", "cards", "stamps", "pens")


def _word(rng: random.Random, level: int = 2) -> Problem:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    total = rng.randint(2, 9)
    sentences, steps = [f"{name} has {total} {thing}."], [f"start: {total}"]
    for _ in range(rng.randint(*((1, 2) if level == 1 else (2, 3)))):
        if total > 1 and rng.random() < 0.5:
            k = rng.randint(1, min(total - 1, 9))
            sentences.append(f"{name} gives away {k}.")
            steps.append(f"gives away {k}: {total} - {k} = {total - k}")
            total -= k
        else:
            k = rng.randint(1, 9)
            sentences.append(f"{name} gets {k} more.")
            steps.append(f"gets {k}: {total} + {k} = {total + k}")
            total += k
    sentences.append(f"How many {thing} does {name} have now?")
    return Problem("word", " ".join(sentences), "\n".join(steps), str(total))


GENERATORS: dict[str, Callable[..., Problem]] = {
    "sum": _sum, "add": _add, "count": _count, "sort": _sort, "convert": _convert,
    "word": _word}


def make_problem(task: str, rng: random.Random, level: int = 2) -> Problem:
    if task not in GENERATORS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    p = GENERATORS[task](rng, level)
    return Problem(p.task, p.question, p.reasoning, p.answer, level)


def problems(n: int, seed: int, tasks: tuple = TASKS, exclude: Optional[set] = None,
             levels: tuple = (2,)) -> list[Problem]:
    """`n` problems cycling over `tasks` and, within each round of the tasks, over `levels`
    (seeded). `exclude`: questions to skip (the held-out eval set is generated with another
    seed and excluded from training data)."""
    rng = random.Random(seed)
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        k = len(out)
        p = make_problem(tasks[k % len(tasks)], rng, levels[(k // len(tasks)) % len(levels)])
        tries += 1
        if exclude and p.question in exclude:
            if tries > 100 * (n + 10):
                raise ValueError("could not generate enough problems outside the exclude set")
            continue
        out.append(p)
    return out


# ------------------------------------------------------------------ verifier
_NUM = re.compile(r"-?\d+")


def extract_answer(task: str, content: Optional[str]) -> Optional[str]:
    """The answer a reply gives: its last integer, or for ``sort`` all its integers."""
    if not content:
        return None
    nums = _NUM.findall(content)
    if not nums:
        return None
    if task == "sort":
        return " ".join(str(int(x)) for x in nums)
    return str(int(nums[-1]))


def verify(task: str, content: Optional[str], answer: str) -> bool:
    """Whether the reply content answers correctly (see :func:`extract_answer`)."""
    got = extract_answer(task, content)
    return got is not None and got == extract_answer(task, answer)


def task_reward(completion_text: str, sample: dict) -> float:
    """GRPO reward (rewards.N.name: callable, function: qwen3_fast.demo.tasks:task_reward):
    1.0 when the reply's answer (the text after its think block) verifies, else 0.0."""
    answer = completion_text.rpartition("</think>")[2]
    return float(verify(sample.get("task", "sum"), answer, str(sample["answer"])))


def task_reward_in_mode(completion_text: str, sample: dict) -> float:
    """General-RL reward (function: qwen3_fast.demo.tasks:task_reward_in_mode): 1.0 when
    the answer verifies AND the reply follows the requested mode (train/rewards.py
    mode_reward). Ungated, a reply that reasons where no thinking was asked earned the
    accuracy it buys that way (0.3 against 0.07 for the tiny teacher), which cancelled the
    mode reward: 16 general-RL steps left the reward flat."""
    from qwen3_fast.train.rewards import mode_reward

    return task_reward(completion_text, sample) * mode_reward(completion_text, sample)


__all__ = ["GENERATORS", "LEVELS", "MULTI_STEP_TASKS", "Problem", "TASKS", "extract_answer",
           "make_problem", "problems", "task_reward", "task_reward_in_mode", "verify"]
