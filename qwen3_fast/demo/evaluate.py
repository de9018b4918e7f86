"""Evaluation of a demo checkpoint on the held-out tasks (demo/data.py eval.jsonl).

All through the package's own engine (qwen3_fast.LLM on the stage's HF model directory):

- :func:`evaluate_modes`: greedy accuracy in thinking and non-thinking mode (overall, per
  task, and on the multi-step tasks), and the mode-following rate: the reply has a
  non-empty think block iff thinking was asked, over four ways of asking
  (enable_thinking true / false, and the ``/think`` / ``/no_think`` flags in the user turn).
- :func:`budget_curve`: thinking-mode accuracy with ``thinking_budget=N`` for a few N.
- :func:`pass_at_k`: sampled accuracy (pass@1 = mean over samples, pass@k = any of k).
- :func:`speculative_speedup`: QuantSpec self-speculative decoding (4-bit KV draft over the
  8-bit cache) against plain decoding on the same int8 cache: acceptance rate and wall-clock
  speedup. The cache quantizes groups of G tokens and keeps the newest 2G in full
  precision, so G is small (16) and the replies long (``ignore_eos``) for the draft to read
  actual 4-bit history.
"""
from __future__ import annotations

import time
from typing import Sequence

from qwen3_fast.demo.tasks import MULTI_STEP_TASKS, verify


def _convs(records: Sequence[dict], flag: str = "") -> list[list[dict]]:
    out = []
    for r in records:
        msgs = [dict(m) for m in r["messages"]]
        if flag:
            msgs[-1]["content"] = msgs[-1]["content"] + " " + flag
        out.append(msgs)
    return out


def _has_thinking(o) -> bool:
    return bool((o.reasoning_content or "").strip())


def _accuracy(records, outs) -> dict:
    ok = [verify(r["task"], o.content, r["answer"]) for r, o in zip(records, outs)]
    per_task: dict = {}
    for r, good in zip(records, ok):
        per_task.setdefault(r["task"], []).append(good)
    per_level: dict = {}
    for r, good in zip(records, ok):
        per_level.setdefault(str(r.get("level", 2)), []).append(good)
    multi = [g for r, g in zip(records, ok) if r["task"] in MULTI_STEP_TASKS]
    return {"acc": sum(ok) / len(ok),
            "acc_multi_step": sum(multi) / len(multi) if multi else 0.0,
            "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
            "per_level": {t: sum(v) / len(v) for t, v in sorted(per_level.items())}}


def load_llm(model_dir: str, max_batch_size: int, max_seq_len: int = 512, **kw):
    from qwen3_fast import LLM

    return LLM(model_dir, max_batch_size=max_batch_size, max_seq_len=max_seq_len, **kw)


def evaluate_modes(llm, records: Sequence[dict], max_think_tokens: int,
                   max_answer_tokens: int = 24, follow: bool = True) -> dict:
    """Greedy accuracy per mode and the mode-following rate (module docstring)."""
    from qwen3_fast import SamplingParams

    think_sp = SamplingParams(temperature=0, max_new_tokens=max_think_tokens)
    plain_sp = SamplingParams(temperature=0, max_new_tokens=max_answer_tokens)
    think = llm.chat(_convs(records), enable_thinking=True, sampling=think_sp)
    plain = llm.chat(_convs(records), enable_thinking=False, sampling=plain_sp)
    a_think, a_plain = _accuracy(records, think), _accuracy(records, plain)
    follows = [_has_thinking(o) for o in think] + [not _has_thinking(o) for o in plain]
    out = {"acc_think": a_think["acc"], "acc_no_think": a_plain["acc"],
           "acc_think_multi_step": a_think["acc_multi_step"],
           "acc_no_think_multi_step": a_plain["acc_multi_step"],
           "per_task_think": a_think["per_task"], "per_task_no_think": a_plain["per_task"],
           "per_level_think": a_think["per_level"],
           "per_level_no_think": a_plain["per_level"], "eval_problems": len(records),
           "think_reply_tokens": sum(len(o.token_ids) for o in think) / len(think)}
    if follow:  # the soft switches, with thinking enabled in the template (Qwen3's default)
        flag_think = llm.chat(_convs(records, "/think"), enable_thinking=True, sampling=think_sp)
        flag_plain = llm.chat(_convs(records, "/no_think"), enable_thinking=True,
                              sampling=SamplingParams(temperature=0,
                                                      max_new_tokens=max_think_tokens))
        follows += [_has_thinking(o) for o in flag_think]
        follows += [not _has_thinking(o) for o in flag_plain]
        out["acc_flag_no_think"] = _accuracy(records, flag_plain)["acc"]
    out["mode_following"] = sum(follows) / len(follows)
    return out


def budget_curve(llm, records: Sequence[dict], budgets: Sequence[int],
                 max_think_tokens: int) -> dict:
    """{budget: thinking-mode greedy accuracy with thinking_budget=budget}."""
    from qwen3_fast import SamplingParams

    sp = SamplingParams(temperature=0, max_new_tokens=max_think_tokens + 40)
    out = {}
    for b in budgets:
        outs = llm.chat(_convs(records), enable_thinking=True, thinking_budget=int(b),
                        sampling=sp)
        out[str(b)] = _accuracy(records, outs)["acc"]
    return out


def pass_at_k(llm, records: Sequence[dict], k: int, max_think_tokens: int,
              temperature: float = 0.6, seed: int = 0) -> dict:
    """k sampled thinking replies per problem: pass@1 (mean correctness, the unbiased
    estimate from k samples) and pass@k (some reply correct)."""
    from qwen3_fast import SamplingParams

    convs, params = [], []
    for i, c in enumerate(_convs(records)):
        for j in range(k):
            convs.append(c)
            params.append(SamplingParams(temperature=temperature, top_p=0.95, top_k=20,
                                         max_new_tokens=max_think_tokens,
                                         seed=seed + 1000 * i + j))
    outs = llm.chat(convs, enable_thinking=True, sampling=params)
    ok = [verify(r["task"], outs[i * k + j].content, r["answer"])
          for i, r in enumerate(records) for j in range(k)]
    p1 = sum(ok) / len(ok)
    pk = sum(any(ok[i * k:(i + 1) * k]) for i in range(len(records))) / len(records)
    return {"pass@1": p1, f"pass@{k}": pk, "k": k, "problems": len(records)}


def pass_counts(model_dir: str, records: Sequence[dict], k: int, max_new_tokens: int,
                temperature: float = 1.0, batch: int = 128, seed: int = 0) -> list[int]:
    """How many of `k` sampled replies (each record in its own mode, at the RL rollout's
    temperature) answer each record correctly: the difficulty of each prompt for this
    model, for RL query filtering (stages.filter_rl_prompts)."""
    from qwen3_fast import SamplingParams

    llm = load_llm(model_dir, max_batch_size=batch, max_seq_len=128 + max_new_tokens)
    convs, params, modes = [], [], []
    for i, (r, c) in enumerate(zip(records, _convs(records))):
        for j in range(k):
            convs.append(c)
            modes.append(r.get("enable_thinking", True))
            params.append(SamplingParams(temperature=temperature, top_p=1.0, top_k=0,
                                         max_new_tokens=max_new_tokens,
                                         seed=seed + 1000 * i + j))
    outs = []
    for think in (True, False):  # one chat call per mode (enable_thinking is per call)
        idx = [i for i, m in enumerate(modes) if m == think]
        if idx:
            got = llm.chat([convs[i] for i in idx], enable_thinking=think,
                           sampling=[params[i] for i in idx])
            outs.extend(zip(idx, got))
    by_index = dict(outs)
    return [sum(verify(r["task"], by_index[i * k + j].content, r["answer"])
                for j in range(k)) for i, r in enumerate(records)]


def speculative_speedup(model_dir: str, records: Sequence[dict], new_tokens: int,
                        group_size: int = 16, gamma: int = 4, batch: int = 4) -> dict:
    """Plain int8-cache decoding vs QuantSpec on the same prompts (greedy, ignore_eos, so
    every reply has `new_tokens` tokens): wall seconds, acceptance rate, speedup, and
    whether the outputs agree (greedy speculative decoding must reproduce plain greedy)."""
    from qwen3_fast import QuantSpecConfig, SamplingParams

    recs = list(records[:batch])
    seq = 64 + new_tokens + 16
    sp = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    plain = load_llm(model_dir, batch, seq, kv_cache="int8", group_size=group_size)
    spec = load_llm(model_dir, batch, seq, kv_cache="int8",
                    speculative=QuantSpecConfig(gamma=gamma, group_size=group_size))
    plain.chat(_convs(recs[:1]), sampling=SamplingParams(temperature=0, max_new_tokens=4))
    spec.chat(_convs(recs[:1]), sampling=SamplingParams(temperature=0, max_new_tokens=4))
    t0 = time.perf_counter()
    a = plain.chat(_convs(recs), sampling=sp)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = spec.chat(_convs(recs), sampling=sp)
    t_spec = time.perf_counter() - t0
    stats = [o.speculative or {} for o in b]
    drafted = sum(s.get("drafted", 0) for s in stats)
    accepted = sum(s.get("accepted", 0) for s in stats)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(a)
    return {"acceptance_rate": accepted / drafted if drafted else 0.0,
            "speedup": t_plain / t_spec if t_spec > 0 else 0.0,
            "plain_seconds": t_plain, "speculative_seconds": t_spec,
            "tokens_per_step": stats[0].get("tokens_per_step") if stats else None,
            "speedup_estimate": stats[0].get("speedup_estimate") if stats else None,
            "same_output_fraction": same, "group_size": group_size, "gamma": gamma,
            "new_tokens": new_tokens}


def evaluate_stage(model_dir: str, records: Sequence[dict], settings: dict,
                   extras: Sequence[str] = ()) -> dict:
    """The figures of one stage: modes (always; on the first ``settings["eval_modes"]``
    records) and the `extras` asked for ("budget", "pass_at_k": on the first
    ``pass_k_problems`` records, None: all, "speculative")."""
    llm = load_llm(model_dir, max_batch_size=settings["eval_batch"],
                   max_seq_len=settings["eval_seq"])
    modes_records = records[:settings.get("eval_modes")]  # the greedy evals: the first N
    figures = evaluate_modes(llm, modes_records, settings["max_think_tokens"],
                             follow=settings.get("follow", True))
    if "budget" in extras:
        figures["budget_curve"] = budget_curve(llm, modes_records, settings["budgets"],
                                               settings["max_think_tokens"])
    if "pass_at_k" in extras:
        figures["pass_at_k"] = pass_at_k(llm, records[:settings.get("pass_k_problems")],
                                         settings["pass_k"], settings["max_think_tokens"])
    if "speculative" in extras:
        figures["speculative"] = speculative_speedup(model_dir, records,
                                                     settings["spec_new_tokens"])
    return figures


__all__ = ["budget_curve", "evaluate_modes", "evaluate_stage", "load_llm", "pass_at_k",
           "pass_counts",
           "speculative_speedup"]
