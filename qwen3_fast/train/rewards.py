"""GRPO reward functions, one signature: ``fn(completion_text: str, sample: dict) -> float``.

`sample` is the RL prompt record (contracts): ``messages`` (ending with a user turn) or
``prompt``, optional ``answer`` (reference), ``task`` and ``enable_thinking``. The completion
is the generated reply text (special tokens skipped; ``<think>`` / ``</think>`` kept).

Built-in rewards (config name -> function):
- ``math``: 1.0 when ``math-verify`` finds the reply's final answer (the text after
  ``</think>``) equal to the reference ("1/2", "0.5" and "\\frac{1}{2}" all match);
- ``exact_match``: 1.0 when the final answer, whitespace-collapsed, equals the reference;
- ``format``: 1.0 for a well-formed reply: a thinking prompt gets exactly one
  ``<think>...</think>`` block at the start followed by a non-empty answer; a non-thinking
  prompt (``enable_thinking: false``, whose prompt already carries the empty block) gets no
  think tags and a non-empty answer;
- ``mode``: 1.0 when the reply follows the requested mode (:func:`thinking_requested`): a
  non-empty think block iff thinking is asked, the empty ``<think>\\n\\n</think>`` block when
  ``/no_think`` is (or the prompt's own empty block under ``enable_thinking: false``).
Configurable ones (:func:`build_reward`): ``callable`` (any Python function given as
"module:function"), ``reward_model`` and ``judge`` (:class:`YesNoScorer`, or for ``judge``
a "module:function" callable ``judge(question, reply, reference) -> float``).

:class:`RewardSet` applies a list of :class:`RewardSpec` (weights, per-task selection) to a
batch of completions: the total reward of a completion is sum(weight * r) over the specs
whose ``tasks`` include the sample's task (an empty list means every task).
"""
from __future__ import annotations

import importlib
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

RewardFn = Callable[[str, dict], float]
THINK_START, THINK_END = "<think>", "</think>"
_FLAG = re.compile(r"/(no_think|think)\b")
ACCURACY_REWARDS = ("math", "exact_match", "judge")


@dataclass
class RewardSpec:
    """One reward term of a GRPO config.

    name : math | exact_match | format | mode | callable | reward_model | judge
    weight : multiplies the reward in the total
    tasks : sample tasks it applies to (record field "task", default "default"); [] = all
    function : "module:function" (callable: fn(text, sample) -> float; judge:
        judge(question, reply, reference) -> float)
    path : checkpoint directory of the reward model / judge model (YesNoScorer)
    label : metric name (default: name)
    accuracy : counts toward the accuracy metric (default: math, exact_match, judge)
    """

    name: str = "math"
    weight: float = 1.0
    tasks: list[str] = field(default_factory=list)
    function: Optional[str] = None
    path: Optional[str] = None
    label: Optional[str] = None
    accuracy: Optional[bool] = None

    @property
    def metric(self) -> str:
        return self.label or self.name

    @property
    def counts_accuracy(self) -> bool:
        return self.accuracy if self.accuracy is not None else self.name in ACCURACY_REWARDS


# ------------------------------------------------------------------ sample helpers
def sample_messages(sample: dict) -> list[dict]:
    """The conversation of an RL prompt record (``messages``, or ``prompt`` as one user turn)."""
    if "messages" in sample:
        return list(sample["messages"])
    if "prompt" in sample:
        return [{"role": "user", "content": sample["prompt"]}]
    raise ValueError("sample: expected a 'messages' list or a 'prompt' string")


def last_user_text(sample: dict) -> str:
    for m in reversed(sample_messages(sample)):
        if m.get("role") == "user":
            return m.get("content") or ""
    raise ValueError("sample: the conversation has no user turn")


def thinking_requested(sample: dict) -> bool:
    """The mode asked for: the last ``/think`` or ``/no_think`` flag of the last user turn
    wins, else ``enable_thinking`` (default true), as in Qwen3."""
    flags = _FLAG.findall(last_user_text(sample))
    if flags:
        return flags[-1] == "think"
    return bool(sample.get("enable_thinking", True))


def split_think(text: str) -> tuple[Optional[str], str]:
    """(reasoning or None when the reply has no closed think block, final answer)."""
    if THINK_END not in text:
        return None, text.strip()
    before, _, after = text.partition(THINK_END)
    reasoning = before.split(THINK_START, 1)[-1] if THINK_START in before else before
    return reasoning.strip(), after.strip()


def final_answer(text: str) -> str:
    """The reply after its think block (all of it when there is none)."""
    return split_think(text)[1]


def _reference(sample: dict, reward: str) -> str:
    ref = sample.get("answer")
    if ref is None:
        raise ValueError(f"reward {reward!r}: the sample has no 'answer' (reference) field")
    return str(ref)


# ------------------------------------------------------------------ built-in rewards
def math_reward(completion_text: str, sample: dict) -> float:
    """1.0 when math-verify judges the final answer equal to the reference, else 0.0."""
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    gold = parse(_reference(sample, "math"), parsing_timeout=timeout)
    pred = parse(final_answer(completion_text), parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match_reward(completion_text: str, sample: dict) -> float:
    """1.0 when the final answer equals the reference up to whitespace, else 0.0."""
    return float(_normalize(final_answer(completion_text)) ==
                 _normalize(_reference(sample, "exact_match")))


def format_reward(completion_text: str, sample: dict) -> float:
    """1.0 for a well-formed reply of the prompt's rendering (module docstring), else 0.0."""
    text = completion_text.lstrip()
    starts, ends = text.count(THINK_START), text.count(THINK_END)
    if not sample.get("enable_thinking", True):  # the prompt ends with the empty block
        return float(starts == 0 and ends == 0 and bool(text.strip()))
    if starts != 1 or ends != 1 or not text.startswith(THINK_START):
        return 0.0
    return float(bool(split_think(text)[1]))


def mode_reward(completion_text: str, sample: dict) -> float:
    """1.0 when the reply's think block matches :func:`thinking_requested`, else 0.0."""
    text = completion_text.lstrip()
    if THINK_START in text and THINK_END in text and text.startswith(THINK_START):
        reasoning, answer = split_think(text)
    elif not sample.get("enable_thinking", True) and THINK_START not in text \
            and THINK_END not in text:
        reasoning, answer = "", text.strip()  # the prompt's own empty block
    else:
        return 0.0
    if not answer:
        return 0.0
    return float(bool(reasoning) == thinking_requested(sample))


BUILTIN: dict[str, RewardFn] = {"math": math_reward, "exact_match": exact_match_reward,
                                "format": format_reward, "mode": mode_reward}


def import_callable(spec: str) -> Callable:
    """The object named by "package.module:attribute"."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"function: expected 'module:function', got {spec!r}")
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"function: {spec!r} is not callable")
    return obj


# ------------------------------------------------------------------ model-based scoring
class YesNoScorer:
    """A Qwen3 checkpoint used as a generative reward model or reference-answer judge.

    Score of a reply = P(yes) / (P(yes) + P(no)) of the model's next token after this chat
    (rendered with our Qwen3 template, non-thinking generation prompt)::

        <the sample's conversation>  assistant: <final answer of the reply>
        user: <REWARD_QUESTION>                (reward model)
        user: <JUDGE_QUESTION with reference>  (judge)

    i.e. softmax over the two logits of the first tokens of "yes" and "no". In [0, 1]; any
    chat checkpoint works unchanged (no extra head file), a fine-tuned verifier works best.
    """

    REWARD_QUESTION = ("Is your previous reply correct and helpful? Answer with yes or no.")
    JUDGE_QUESTION = ("The reference answer is: {reference}\nDoes your previous reply agree "
                      "with the reference answer? Answer with yes or no.")

    def __init__(self, path: str, device=None, dtype=None):
        from qwen3_fast.model import Qwen3ForCausalLM
        from qwen3_fast.tokenizer import Qwen3Tokenizer

        self.model = Qwen3ForCausalLM.from_pretrained(path, dtype=dtype, device=device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = Qwen3Tokenizer.from_pretrained(path)
        yes, no = self.tokenizer.encode("yes"), self.tokenizer.encode("no")
        if not yes or not no or yes[0] == no[0]:
            raise ValueError(f"{path}: the tokenizer cannot tell 'yes' from 'no' by the first "
                             "token")
        self.yes_id, self.no_id = yes[0], no[0]

    def prompt_ids(self, sample: dict, reply: str, reference: Optional[str] = None) -> list:
        question = (self.REWARD_QUESTION if reference is None
                    else self.JUDGE_QUESTION.format(reference=reference))
        conv = sample_messages(sample) + [{"role": "assistant", "content": final_answer(reply)},
                                          {"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(conv, add_generation_prompt=True,
                                                  enable_thinking=False)

    def score(self, sample: dict, reply: str, reference: Optional[str] = None) -> float:
        import torch

        ids = torch.tensor([self.prompt_ids(sample, reply, reference)],
                           device=self.model.device)
        with torch.inference_mode():
            out = self.model(ids, logits_to_keep=1)
        pair = out.logits[0, -1, [self.yes_id, self.no_id]].float()
        return float(torch.softmax(pair, dim=0)[0])

    def reward(self, completion_text: str, sample: dict) -> float:
        return self.score(sample, completion_text)

    def judge(self, completion_text: str, sample: dict) -> float:
        return self.score(sample, completion_text, _reference(sample, "judge"))


def reference_in_reply_judge(question: str, reply: str, reference: str) -> float:
    """A rule-based judge callable: 1.0 when the reference (whitespace-collapsed, any case)
    appears in the final answer. An example of the ``judge(question, reply, reference)``
    signature that a model-backed judge (an API call, a local LLM) implements the same way."""
    return float(_normalize(reference).lower() in _normalize(reply).lower())


def _judge_callable(fn: Callable) -> RewardFn:
    def reward(completion_text: str, sample: dict) -> float:
        return float(fn(last_user_text(sample), final_answer(completion_text),
                        _reference(sample, "judge")))
    return reward


def build_reward(spec: RewardSpec, device=None) -> RewardFn:
    """The reward function of one spec (module docstring)."""
    if spec.name == "math":
        try:
            import math_verify  # noqa: F401 (fail at startup, not in the first scoring)
        except ImportError:
            raise ImportError("the math reward checks answers with math-verify: "
                              "pip install 'qwen3-fast[rl]' (or math-verify)") from None
    if spec.name in BUILTIN:
        return BUILTIN[spec.name]
    if spec.name == "callable":
        return import_callable(spec.function)
    if spec.name == "reward_model":
        if not spec.path:
            raise ValueError("reward_model: expected path (a checkpoint directory)")
        return YesNoScorer(spec.path, device=device).reward
    if spec.name == "judge":
        if spec.function:
            return _judge_callable(import_callable(spec.function))
        if spec.path:
            return YesNoScorer(spec.path, device=device).judge
        raise ValueError("judge: expected function ('module:function') or path (a model)")
    raise ValueError(f"reward name: expected one of {', '.join(REWARD_NAMES)}, got "
                     f"{spec.name!r}")


REWARD_NAMES = (*BUILTIN, "callable", "reward_model", "judge")


def sample_task(sample: dict) -> str:
    return str(sample.get("task") or "default")


class RewardSet:
    """The reward specs of a config, built once; scores batches of completions."""

    def __init__(self, specs: list[RewardSpec], device=None,
                 functions: Optional[list[RewardFn]] = None):
        if not specs:
            raise ValueError("rewards: expected at least one reward")
        self.specs = list(specs)
        self.functions = functions or [build_reward(s, device) for s in self.specs]

    def applicable(self, sample: dict) -> list[int]:
        task = sample_task(sample)
        idx = [i for i, s in enumerate(self.specs) if not s.tasks or task in s.tasks]
        if not idx:
            raise ValueError(f"rewards: no reward applies to task {task!r} (give one with "
                             f"tasks: [{task}] or tasks: [])")
        return idx

    def score(self, texts: list[str], samples: list[dict]) -> dict:
        """Rewards of completions `texts` of `samples` (same length).

        Returns
        -------
        dict with "total" (list of weighted sums), "accuracy" (list: mean of the accuracy
        rewards that apply, NaN when none do) and "per_reward" (metric name -> mean over the
        completions it applied to)
        """
        total, acc = [], []
        sums: dict[str, list[float]] = {}
        for text, sample in zip(texts, samples):
            t, a = 0.0, []
            for i in self.applicable(sample):
                spec = self.specs[i]
                r = float(self.functions[i](text, sample))
                if not math.isfinite(r):
                    raise ValueError(f"reward {spec.metric!r} returned {r}")
                t += spec.weight * r
                sums.setdefault(spec.metric, []).append(r)
                if spec.counts_accuracy:
                    a.append(r)
            total.append(t)
            acc.append(sum(a) / len(a) if a else float("nan"))
        return {"total": total, "accuracy": acc,
                "per_reward": {k: sum(v) / len(v) for k, v in sums.items()}}


__all__ = ["BUILTIN", "REWARD_NAMES", "RewardFn", "RewardSet", "RewardSpec", "YesNoScorer",
           "build_reward", "exact_match_reward", "final_answer", "format_reward",
           "import_callable", "math_reward", "reference_in_reply_judge", "mode_reward", "sample_messages", "sample_task",
           "split_think", "thinking_requested"]
