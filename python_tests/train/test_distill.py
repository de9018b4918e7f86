"""train/distill.py (+ distill_data, distill_losses, distill_on_policy): strong-to-weak
distillation on tiny random models."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from qwen3_fast import chat_format
from qwen3_fast.train.config import load_config
from qwen3_fast.train.data import IGNORE_INDEX
from qwen3_fast.train.distill import STAGES, check_shared_tokenizer, run
from qwen3_fast.train.distill_data import (KDPackedStream, generate_teacher_data,
                                           load_prompts, read_samples)
from qwen3_fast.train.distill_losses import teacher_topk, topk_kd_loss
from qwen3_fast.train.distill_on_policy import jsd_on_sequences, pack_sequences
from qwen3_fast.train.sft_data import tokenize_chat

from train_testlib import RECIPES, metrics, one_thread  # noqa: F401 (fixture)

PROMPTS = str(RECIPES / "data" / "distill_prompts_tiny.jsonl")
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=False)
STUDENT = ["model.overrides." + k + "=" + str(v).lower() if isinstance(v, bool) else
           f"model.overrides.{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def tokenizer():
    from qwen3_fast.tokenizer_train import build_test_tokenizer

    return build_test_tokenizer()


def make_model(path, tokenizer, seed: int, head_scale: float = 1.0, **overrides):
    """A tiny random Qwen3 saved with the tokenizer; head_scale > 1 sharpens its next-token
    distributions (a teacher that is far from uniform)."""
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config.from_name("Qwen3-0.6B", **{**TINY, **overrides}))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def config(recipe: str, out_dir, *overrides: str):
    return load_config(str(RECIPES / f"{recipe}.yaml"),
                       [f"output_dir={out_dir}", "progress=false", "precision=fp32",
                        *overrides], stages=STAGES)


# ------------------------------------------------------------------ the shared tokenizer
def test_teacher_and_student_must_share_a_tokenizer(tmp_path, tokenizer):
    from qwen3_fast.tokenizer_train import build_test_tokenizer

    other = build_test_tokenizer(texts=["completely different text " * 20, "abc xyz " * 30],
                                 vocab_size=300)
    check_shared_tokenizer(tokenizer, tokenizer, 512, 512)  # the same: accepted
    with pytest.raises(ValueError, match="must share a tokenizer: vocabularies differ"):
        check_shared_tokenizer(other, tokenizer)
    with pytest.raises(ValueError, match="config vocab_size differs .student 640, teacher 512"):
        check_shared_tokenizer(tokenizer, tokenizer, 640, 512)
    # through the recipe: refused before the teacher generates anything
    teacher = make_model(tmp_path / "teacher", tokenizer, 0)
    other.save_pretrained(tmp_path / "other_tok")
    cfg = config("distill_off_policy_tiny", tmp_path / "out", f"teacher={teacher}",
                 f"data.tokenizer={tmp_path / 'other_tok'}", *STUDENT)
    with pytest.raises(ValueError, match="vocabularies differ"):
        run(cfg)
    cfg = config("distill_on_policy_tiny", tmp_path / "out2", f"teacher={teacher}",
                 "model.init_from=null", *STUDENT, "model.overrides.vocab_size=640")
    with pytest.raises(ValueError, match="config vocab_size differs"):
        run(cfg)
    assert not os.path.exists(tmp_path / "out" / "teacher_data.jsonl")


# ------------------------------------------------------------------ off-policy data
class ScriptedEngine:
    """Stands in for LLM.chat: a reply determined by the request's seed and mode."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after

    def chat(self, convs, enable_thinking, sampling):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed mid-generation")
        self.calls.append((len(convs), enable_thinking))
        outs = []
        for conv, sp in zip(convs, sampling):
            answer = f"answer {sp.seed % 97} to {conv[-1]['content'][:8]}"
            if enable_thinking:
                reasoning = f"thinking {sp.seed % 13}"
                text = f"<think>\n{reasoning}\n</think>\n\n{answer}"
                reason = "length" if sp.seed % 5 == 0 else "stop"
                outs.append(SimpleNamespace(text=text, reasoning_content=reasoning,
                                            content=answer, finish_reason=reason))
            else:
                outs.append(SimpleNamespace(text=answer, reasoning_content=None,
                                            content=answer, finish_reason="stop"))
        return outs


def _generate(engine, path, keep_truncated=True):
    prompts = load_prompts([PROMPTS])
    settings = {"keep_truncated": keep_truncated}
    return generate_teacher_data(engine, prompts, str(path), ["thinking", "non_thinking"],
                                 True, 1, {"max_new_tokens": 8}, 3, 4, keep_truncated,
                                 settings)


def test_off_policy_data_has_both_modes_in_the_chat_format(tmp_path, tokenizer):
    prompts = load_prompts([PROMPTS])
    fixed = [p.enable_thinking for p in prompts]
    assert fixed.count(None) == 6 and fixed.count(True) == 2 and fixed.count(False) == 4
    summary = _generate(ScriptedEngine(), tmp_path / "d.jsonl")
    assert summary["thinking"] == 6 + 2 and summary["non_thinking"] == 6 + 4
    samples = read_samples(tmp_path / "d.jsonl")
    assert len(samples) == 18
    for messages in samples:
        reply = messages[-1]
        assert reply["role"] == "assistant" and messages[-2]["role"] == "user"
        prompt = chat_format.render_chat(messages[:-1], add_generation_prompt=True)
        text = chat_format.render_chat(messages)
        assert text.startswith(prompt)
        if reply["reasoning_content"] == "":  # non-thinking: the empty think block
            assert text[len(prompt):].startswith(chat_format.EMPTY_THINK + "answer")
        else:
            assert text[len(prompt):].startswith("<think>\nthinking ")
            assert "</think>\n\nanswer" in text
        ids, labels = tokenize_chat(messages, tokenizer)
        reply_ids = [y for y in labels if y != IGNORE_INDEX]
        assert tokenizer.decode(reply_ids).endswith("<|im_end|>")
    # truncated replies are dropped unless kept
    dropped = _generate(ScriptedEngine(), tmp_path / "e.jsonl", keep_truncated=False)
    assert dropped["dropped"] > 0 and dropped["samples"] == 18 - dropped["dropped"]


def test_off_policy_generation_resumes_and_reuses(tmp_path):
    full = tmp_path / "full.jsonl"
    _generate(ScriptedEngine(), full)
    cut = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _generate(ScriptedEngine(fail_after=2), cut)
    assert os.path.isfile(str(cut) + ".progress.json")
    with open(cut, "a", encoding="utf-8") as f:
        f.write('{"messages": [half a li')  # a torn write after the last recorded batch
    engine = ScriptedEngine()
    _generate(engine, cut)
    assert sum(n for n, _ in engine.calls) == 18 - 8  # two batches of 4 were done already
    assert cut.read_bytes() == full.read_bytes()
    again = ScriptedEngine()
    _generate(again, cut)
    assert again.calls == []  # finished with the same settings: reused
    with pytest.raises(ValueError, match="generated with other settings"):
        _generate(ScriptedEngine(), cut, keep_truncated=False)


def test_real_teacher_generates_both_modes(tmp_path, tokenizer, one_thread):
    from qwen3_fast.generate import LLM
    from qwen3_fast.model import Qwen3ForCausalLM

    path = make_model(tmp_path / "t", tokenizer, 0)
    engine = LLM.from_model(Qwen3ForCausalLM.from_pretrained(path), tokenizer, max_batch_size=8,
                            max_seq_len=256)
    out = _generate(engine, tmp_path / "d.jsonl")
    assert out["thinking"] == 8 and out["non_thinking"] == 10
    samples = read_samples(tmp_path / "d.jsonl")
    for messages in samples:
        assert isinstance(messages[-1]["content"], str)
        assert isinstance(messages[-1]["reasoning_content"], str)
    # units are mode-major: the last 10 are the non-thinking replies, with an empty think
    # block, and rendered they put the reply right after it
    for messages in samples[8:]:
        assert messages[-1]["reasoning_content"] == ""
        text = chat_format.render_chat(messages)
        assert chat_format.EMPTY_THINK + messages[-1]["content"] in text


# ------------------------------------------------------------------ top-k KD
def _kd_reference(hidden, weight, ids, lps, mask):
    logp = torch.log_softmax((hidden @ weight.t()).double(), -1)  # full [T, V] logits
    q = torch.softmax(lps.double(), -1)
    rows = -(q * logp.gather(-1, ids)).sum(-1)
    return (rows * mask).sum()


def test_topk_kd_matches_the_full_logits_reference():
    torch.manual_seed(0)
    t, h, v, k = 11, 8, 40, 5
    hidden = torch.randn(t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    t_ids, t_lps = teacher_topk(torch.randn(t, 6), torch.randn(v, 6) * 2, k, chunk_size=4)
    mask = torch.rand(t) > 0.3
    loss = topk_kd_loss(hidden, weight, t_ids, t_lps, mask, chunk_size=3)
    ref = _kd_reference(hidden, weight, t_ids, t_lps, mask)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(2.5 * loss, (hidden, weight))
    rh, rw = torch.autograd.grad(2.5 * ref, (hidden, weight))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    # masked rows: no loss and no gradient, whatever their top-k holds
    assert torch.all(gh[~mask] == 0)
    junk = t_lps.clone()
    junk[~mask] = torch.randn(int((~mask).sum()), k)
    torch.testing.assert_close(topk_kd_loss(hidden, weight, t_ids, junk, mask), loss)


def test_teacher_topk_matches_torch_topk():
    torch.manual_seed(1)
    hidden, weight = torch.randn(9, 8), torch.randn(50, 8)
    ids, lps = teacher_topk(hidden, weight, 4, chunk_size=2)
    ref = torch.log_softmax(hidden @ weight.t(), -1).topk(4, -1)
    assert torch.equal(ids, ref.indices)
    torch.testing.assert_close(lps, ref.values)


def test_kd_rows_align_the_teacher_topk_with_the_reply_tokens(tmp_path, tokenizer):
    samples = [[{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there", "reasoning_content": ""}],
               [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "add"}]]
    with open(tmp_path / "d.jsonl", "w") as f:
        for m in samples:
            f.write(json.dumps({"messages": m}) + "\n")
    with open(tmp_path / "k.jsonl", "w") as f:  # tag each reply token's top-k with its id
        for m in samples:
            ids, labels = tokenize_chat(m, tokenizer)
            lab = [y for y in labels[1:] if y != IGNORE_INDEX]
            f.write(json.dumps({"ids": [[y, 0] for y in lab],
                                "logprobs": [[-0.1, -3.0]] * len(lab)}) + "\n")
    stream = KDPackedStream(str(tmp_path / "d.jsonl"), str(tmp_path / "k.jsonl"), tokenizer,
                            64, 2, seed=0)
    for _ in range(3):
        row = stream.next_row()
        assert all(len(row[key]) == 64 for key in row)
        for t in range(63):
            nxt = row["labels"][t + 1]
            if nxt != IGNORE_INDEX:  # hidden t carries the teacher's view of token t + 1
                assert row["kd_ids"][t][0] == nxt and row["kd_logprobs"][t] == [-0.1, -3.0]
            else:
                assert row["kd_ids"][t] == [0, 0]
        pad = [i for i, x in enumerate(row["input_ids"]) if x == tokenizer.pad_token_id]
        assert all(row["labels"][i] == IGNORE_INDEX for i in pad)
    state = stream.state_dict()
    a = [stream.next_row() for _ in range(3)]
    stream.load_state_dict(json.loads(json.dumps(state)))
    assert [stream.next_row() for _ in range(3)] == a


# ------------------------------------------------------------------ on-policy loss masks
def test_on_policy_loss_counts_only_reply_tokens(tmp_path, tokenizer):
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.ops import reference

    student = Qwen3ForCausalLM.from_pretrained(make_model(tmp_path / "s", tokenizer, 1))
    teacher = Qwen3ForCausalLM.from_pretrained(make_model(tmp_path / "t", tokenizer, 2,
                                                          head_scale=20.0))
    seqs = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17, 18, 2])]
    ids, labels = pack_sequences(seqs, tokenizer.pad_token_id)
    assert ids.shape == (2, 8)
    assert labels.tolist() == [[-100] * 4 + [9, 10, 11] + [-100],
                               [-100] * 2 + [14, 15, 16, 17, 18, 2]]
    for beta in (0.0, 0.5, 1.0):
        loss, kl, n = jsd_on_sequences(student, teacher, ids, labels, beta, 1.0)
        assert n == 9
        hs = student(ids, return_logits=False).hidden_states
        ht = teacher(ids, return_logits=False).hidden_states
        rows = reference.linear_jsd(hs.reshape(16, -1), student.lm_head.weight,
                                    ht.reshape(16, -1), teacher.lm_head.weight,
                                    torch.zeros(16, dtype=torch.long), beta=beta,
                                    reduction="none").view(2, 8)
        # rows predicting a reply token: positions 3..5 and 1..6
        want = rows[0, 3:6].sum() + rows[1, 1:7].sum()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-4, atol=1e-5)
    # padding content does not matter
    ids2 = ids.clone()
    ids2[0, 7] = 33
    loss2, _, _ = jsd_on_sequences(student, teacher, ids2, labels, 1.0, 1.0)
    torch.testing.assert_close(loss2, loss)
    assert kl == pytest.approx(float(loss.detach()), rel=1e-5)  # beta = 1: the loss is KL(S||T)


# ------------------------------------------------------------------ on-policy training
def _fixed_kl(student_dir, teacher_dir, seqs, tokenizer) -> float:
    from qwen3_fast.model import Qwen3ForCausalLM

    student = Qwen3ForCausalLM.from_pretrained(student_dir)
    teacher = Qwen3ForCausalLM.from_pretrained(teacher_dir)
    ids, labels = pack_sequences(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        _, kl, n = jsd_on_sequences(student, teacher, ids, labels, 1.0, 1.0)
    return kl / n


def test_on_policy_distillation_lowers_the_student_teacher_kl(tmp_path, tokenizer, one_thread):
    from qwen3_fast.generate import LLM, SamplingParams
    from qwen3_fast.model import Qwen3ForCausalLM

    # teacher: 2 layers, sharpened head; student: 1 narrower layer, another random init
    teacher = make_model(tmp_path / "teacher", tokenizer, 0, head_scale=10.0,
                         num_hidden_layers=2)
    student0 = make_model(tmp_path / "student0", tokenizer, 1, intermediate_size=32,
                          head_dim=8)
    t0 = time.perf_counter()
    cfg = config("distill_on_policy_tiny", tmp_path / "on", f"teacher={teacher}",
                 f"model.init_from={student0}", "steps=24", "micro_batch_size=8",
                 "mode=prompt", "sampling.max_new_tokens=16", "save_every=0",
                 "optim.lr=3e-2", "optim.warmup_steps=0", "beta=0.5")
    losses = run(cfg)
    assert len(losses) == 24
    rec = metrics(tmp_path / "on")
    assert {"loss", "kl", "response_length", "rollout_s", "update_s"} <= set(rec[0])
    first = sum(r["kl"] for r in rec[:4]) / 4
    last = sum(r["kl"] for r in rec[-4:]) / 4
    assert last < 0.85 * first, (first, last)
    # on fixed held-out sequences (sampled once from the initial student)
    engine = LLM.from_model(Qwen3ForCausalLM.from_pretrained(student0), tokenizer,
                            max_batch_size=8, max_seq_len=128)
    prompts = [p.messages for p in load_prompts([PROMPTS])][:6]
    outs = engine.chat(prompts, sampling=[SamplingParams(temperature=1.0, top_p=1.0, top_k=0,
                                                         max_new_tokens=16, seed=100 + i)
                                          for i in range(6)])
    seqs = [(o.prompt_token_ids, o.token_ids) for o in outs]
    before = _fixed_kl(student0, teacher, seqs, tokenizer)
    after = _fixed_kl(str(tmp_path / "on" / "model"), teacher, seqs, tokenizer)
    assert after < 0.8 * before, (before, after)
    print(f"on-policy 24 steps: {time.perf_counter() - t0:.1f} s; KL {before:.3f} -> "
          f"{after:.3f}")


# ------------------------------------------------------------------ stages chain
def test_stages_chain_off_policy_output_is_the_on_policy_student(tmp_path, tokenizer,
                                                                  one_thread):
    teacher = make_model(tmp_path / "teacher", tokenizer, 0, head_scale=10.0)
    off = config("distill_off_policy_tiny", tmp_path / "off", f"teacher={teacher}",
                 "steps=3", "sampling.max_new_tokens=6", "topk_kd=4", "save_every=0",
                 "data.seq_len=128")
    losses = run(off)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    rec = metrics(tmp_path / "off")
    assert {"ce", "kd"} <= set(rec[0])
    assert os.path.isfile(tmp_path / "off" / "model" / "tokenizer.json")
    # a rerun reuses the finished data and checkpoint: nothing to do
    data_mtime = os.path.getmtime(tmp_path / "off" / "teacher_data.jsonl")
    assert run(off) == []
    assert os.path.getmtime(tmp_path / "off" / "teacher_data.jsonl") == data_mtime
    # plain SFT on the teacher's samples (topk_kd = 0) through the trainer core
    sft = config("distill_off_policy_tiny", tmp_path / "sft", f"teacher={teacher}",
                 "steps=2", "sampling.max_new_tokens=6", "topk_kd=0", "save_every=0",
                 "data.seq_len=128")
    assert len(run(sft)) == 2
    on = config("distill_on_policy_tiny", tmp_path / "on", f"teacher={teacher}",
                f"model.init_from={tmp_path / 'off' / 'model'}",
                "sampling.max_new_tokens=6", "micro_batch_size=2", "save_every=0",
                "lambda_on_policy=0.5",
                f"off_policy_data={tmp_path / 'off' / 'teacher_data.jsonl'}",
                "steps=4")
    assert len(run(on)) == 4
    kinds = [r["on_policy"] for r in metrics(tmp_path / "on")]
    assert 0 < sum(kinds) < 4  # lambda mixes student rollouts and the teacher's samples
    from qwen3_fast.model import Qwen3ForCausalLM

    assert Qwen3ForCausalLM.from_pretrained(tmp_path / "on" / "model").config.hidden_size == 32


def test_on_policy_resume_reproduces_the_run(tmp_path, tokenizer, one_thread):
    teacher = make_model(tmp_path / "teacher", tokenizer, 0, head_scale=10.0)
    student0 = make_model(tmp_path / "student0", tokenizer, 1, intermediate_size=32)
    args = [f"teacher={teacher}", f"model.init_from={student0}", "steps=4", "save_every=2",
            "micro_batch_size=2", "sampling.max_new_tokens=6"]
    full = run(config("distill_on_policy_tiny", tmp_path / "full", *args))
    first = run(config("distill_on_policy_tiny", tmp_path / "cut", *args, "stop_after=2"))
    rest = run(config("distill_on_policy_tiny", tmp_path / "cut", *args))
    assert len(first) == 2 and first + rest == full
