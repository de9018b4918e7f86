"""Demo tasks: generation is seeded, every worked solution reaches the answer, the
verifier accepts right answers and rejects wrong ones."""
import random

import pytest

from qwen3_fast.demo.tasks import (LEVELS, TASKS, extract_answer, make_problem, problems,
                                   task_reward, task_reward_in_mode, verify)


def _eval_steps(p):
    """Recompute the answer from the worked solution's arithmetic lines."""
    last = None
    for line in p.reasoning.splitlines():
        if "=" in line and ("+" in line or "-" in line) and "write" not in line:
            lhs, _, rhs = line.rpartition("=")
            expr = lhs.split(":")[-1]
            assert eval(expr) == int(rhs.split()[0]), line  # noqa: S307 - digits and +/- only
            last = int(rhs.split()[0])
    return last


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("task", TASKS)
def test_solutions_are_right(task, level):
    rng = random.Random(task)
    for _ in range(200):
        p = make_problem(task, rng, level)
        assert p.task == task and p.level == level and p.question and p.reasoning and p.answer
        assert verify(task, p.answer, p.answer)
        if task in ("sum", "word", "convert"):
            assert str(_eval_steps(p)) == p.answer
        if task == "add":
            a, b = map(int, p.question[len("What is "):-1].split(" + "))
            assert int(p.answer) == a + b
        if task == "count":
            target = p.question.split()[4]
            letters = p.question.rstrip("?").split(":")[1].split()
            assert int(p.answer) == letters.count(target)
        if task == "sort":
            nums = [int(x) for x in p.question.split(":")[1].split()]
            assert p.answer == " ".join(map(str, sorted(nums)))


def test_seeded_and_cycles_tasks():
    a, b = problems(30, seed=5), problems(30, seed=5)
    assert a == b
    assert problems(30, seed=6) != a
    assert [p.task for p in a[:len(TASKS)]] == list(TASKS)


def test_levels_mix_evenly_and_level_1_is_shorter():
    ps = problems(240, seed=3, levels=LEVELS)
    assert [p.level for p in ps[:2 * len(TASKS)]] == [1] * len(TASKS) + [2] * len(TASKS)
    assert sum(p.level == 1 for p in ps) == 120
    assert ps[0].rl_record()["level"] == 1
    for task in TASKS:  # fewer solution steps (or the same) at level 1, on average fewer
        steps = {lv: [len(p.reasoning.splitlines()) for p in ps if p.task == task
                      and p.level == lv] for lv in LEVELS}
        assert max(steps[1]) <= max(steps[2])
        assert sum(steps[1]) / len(steps[1]) <= sum(steps[2]) / len(steps[2])
    with pytest.raises(ValueError, match="level"):
        make_problem("sum", random.Random(0), 3)


def test_exclude_keeps_held_out_questions_out():
    held = {p.question for p in problems(40, seed=1)}
    train = problems(400, seed=2, exclude=held)
    assert not held & {p.question for p in train}


def test_verifier():
    assert verify("sum", "The answer is 26.", "26")
    assert verify("sum", "so 12 and then 26", "26")
    assert not verify("sum", "25", "26")
    assert not verify("sum", "", "26") and not verify("sum", None, "26")
    assert not verify("sum", "no number", "26")
    assert verify("sort", "1 4 8 9 11", "1 4 8 9 11")
    assert not verify("sort", "1 8 4 9 11", "1 4 8 9 11")
    assert not verify("sort", "11", "1 4 8 9 11")
    assert extract_answer("count", "007") == "7"


def test_task_reward_reads_the_answer_after_the_think_block():
    sample = {"task": "sum", "answer": "17"}
    assert task_reward("<think>\n2 + 5 = 7\n</think>\n\n17", sample) == 1.0
    # a right number inside the reasoning only does not count
    assert task_reward("<think>\n17\n</think>\n\n16", sample) == 0.0
    assert task_reward("17", sample) == 1.0


def test_task_reward_in_mode_needs_the_right_answer_in_the_asked_mode():
    def sample(content, **kw):
        return {"task": "sum", "answer": "17",
                "messages": [{"role": "user", "content": content}], **kw}

    thought, direct = "<think>\n2 + 15 = 17\n</think>\n\n17", "<think>\n\n</think>\n\n17"
    assert task_reward_in_mode(thought, sample("What is 2 + 15?")) == 1.0
    assert task_reward_in_mode(direct, sample("What is 2 + 15? /no_think")) == 1.0
    # right answers in the wrong mode earn nothing (task_reward alone gives them 1.0)
    assert task_reward_in_mode(direct, sample("What is 2 + 15? /think")) == 0.0
    assert task_reward_in_mode(thought, sample("What is 2 + 15? /no_think")) == 0.0
    # enable_thinking false: the prompt holds the empty block, reasoning after it is off-mode
    off = sample("What is 2 + 15?", enable_thinking=False)
    assert task_reward_in_mode("17", off) == 1.0
    assert task_reward("2 + 15 = 17\n</think>\n\n17", off) == 1.0
    assert task_reward_in_mode("2 + 15 = 17\n</think>\n\n17", off) == 0.0
    assert task_reward_in_mode("16", off) == 0.0
