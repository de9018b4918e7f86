"""Demo data files (contract formats) and the demo BPE tokenizer."""
import json
import os

from qwen3_fast.chat_format import render_chat
from qwen3_fast.demo.data import build_tokenizer, write_data
from qwen3_fast.demo.tasks import TASKS, verify
from qwen3_fast.tokenizer import QWEN3_ADDED_TOKENS, Qwen3Tokenizer

SIZES = dict(general=20, reasoning=20, long=6, sft=12, rl=12, eval=12)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_files_follow_the_contracts(tmp_path):
    paths = write_data(str(tmp_path), SIZES)
    assert len(_read(paths["general"])) == 20
    assert all(isinstance(r["text"], str) and "Answer:" in r["text"]
               for k in ("general", "reasoning", "long") for r in _read(paths[k]))
    assert all("step by step" in r["text"] for r in _read(paths["reasoning"]))
    for r in _read(paths["sft_think"]):
        user, asst = r["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant"
        assert asst["reasoning_content"] and asst["content"]
    for r in _read(paths["sft_no_think"]):
        asst = r["messages"][-1]
        assert asst["reasoning_content"] == ""
        assert "<think>\n\n</think>\n\n" + asst["content"] in render_chat(r["messages"])
    rl = _read(paths["rl_prompts"])
    assert {r["task"] for r in rl} == set(TASKS)
    assert all(r["messages"][-1]["role"] == "user" and r["answer"] for r in rl)
    held_out = {r["messages"][0]["content"] for r in _read(paths["eval"])}
    train_q = {r["messages"][0]["content"] for k in ("sft_think", "sft_no_think", "rl_prompts")
               for r in _read(paths[k])}
    assert not held_out & train_q
    for r in _read(paths["sft_think"]):  # the worked solution ends at the answer
        asst = r["messages"][-1]
        last = asst["reasoning_content"].splitlines()[-1]
        if not last.startswith("smallest"):  # sort's last line names one number only
            assert verify("sum", last, asst["content"]), r


def test_tokenizer_round_trip_with_special_tokens(tmp_path):
    tok = build_tokenizer(str(tmp_path / "tok"), vocab_size=320)
    assert os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    again = Qwen3Tokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(again) == len(tok) <= 320
    for content, _ in QWEN3_ADDED_TOKENS:  # every Qwen3 added token is one whole token
        assert len(again.encode(content)) == 1
    msgs = [{"role": "user", "content": "What is 3 + 8 + 5? /no_think"},
            {"role": "assistant", "content": "16", "reasoning_content": "3 + 8 = 11\n11 + 5 = 16"}]
    text = render_chat(msgs)
    ids = again.apply_chat_template(msgs)
    assert again.decode(ids) == text
    assert again.think_start_id in ids and again.think_end_id in ids
    assert ids.count(again.im_start_id) == 2 and ids.count(again.im_end_id) == 2
    # digits are single tokens (the Qwen split regex), so running sums stay learnable
    assert all(len(again.encode(d)) == 1 for d in "0123456789")
    # deterministic: the same corpus gives the same vocabulary
    assert build_tokenizer(str(tmp_path / "tok2"), vocab_size=320).get_vocab() == again.get_vocab()
