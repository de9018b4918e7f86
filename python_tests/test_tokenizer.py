"""Qwen3Tokenizer on a small trained test tokenizer: special tokens, encode/decode, padding,
apply_chat_template (Python and checkpoint-Jinja paths), save/load, load errors, and
agreement with transformers' loader on the same files."""

import json
import os

import pytest

from qwen3_fast.chat_format import render_chat
from qwen3_fast.tokenizer import QWEN3_ADDED_TOKENS, Qwen3Tokenizer
from qwen3_fast.tokenizer_train import build_test_tokenizer, train_qwen_bpe

NAMED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
         "<tool_response>", "</tool_response>", "<think>", "</think>"]
TEXTS = [
    "Hello, world! It's 2025.",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF",
    "你好，世界 😀 naïve Größe",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(save_dir=d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Qwen3Tokenizer.from_pretrained(tok_dir)


def test_special_tokens_are_looked_up_not_hard_coded(tok):
    ids = {t: tok.token_to_id(t) for t in NAMED}
    assert all(i is not None and i < tok.vocab_size for i in ids.values())
    assert len(set(ids.values())) == len(NAMED)
    assert tok.eos_token_id == ids["<|im_end|>"] != 151645  # small vocab: other ids, same strings
    assert tok.eos_token_ids == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert tok.pad_token_id == ids["<|endoftext|>"]
    assert (tok.think_start_id, tok.think_end_id) == (ids["<think>"], ids["</think>"])
    assert tok.bos_token_id is None
    # added tokens follow the BPE vocabulary in Qwen3's order, like 151643...151668
    first = tok.vocab_size - len(QWEN3_ADDED_TOKENS)
    assert [tok.token_to_id(t) for t, _ in QWEN3_ADDED_TOKENS] == list(range(first, tok.vocab_size))
    assert tok.vocab_size == len(tok) == len(tok.get_vocab()) == 512


@pytest.mark.parametrize("name", NAMED)
def test_special_token_is_one_id(tok, name):
    tid = tok.token_to_id(name)
    assert tok.encode(name) == [tid]
    ids = tok.encode("Hello" + name + "world")  # matched whole even when glued to text
    assert ids == tok.encode("Hello") + [tid] + tok.encode("world")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_decode_inputs_and_skip_special(tok):
    torch = pytest.importorskip("torch")
    text = TEXTS[3]
    ids = tok.encode(text)
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(tok.im_end_id) == "<|im_end|>"
    # <|...|> tokens are special (skipped); think/tool tags are not, as in Qwen3
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi\nassistant\n<think>\n\n</think>\n\nHello"
    assert tok.batch_decode([ids, tok.encode("ok")]) == [text, "ok"]
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode([ids])


def test_nfc_normalization(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"


def test_batch_encode_left_pads_for_generation(tok):
    texts = ["Hi", "Hello, world! How are you?", ""]
    rows = [tok.encode(t) for t in texts]
    out = tok.batch_encode(texts)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    for r, ids, mask in zip(rows, out["input_ids"], out["attention_mask"]):
        k = width - len(r)
        assert ids == [pad] * k + r and mask == [0] * k + [1] * len(r)
    right = tok.batch_encode(texts, padding_side="right")
    assert right["input_ids"][0] == rows[0] + [pad] * (width - len(rows[0]))
    pytest.importorskip("torch")
    pt = tok.batch_encode(texts, return_tensors="pt")
    assert pt["input_ids"].shape == (3, width) and str(pt["input_ids"].dtype) == "torch.int64"
    assert pt["input_ids"][:, -1].tolist()[:2] == [rows[0][-1], rows[1][-1]]  # last column is real tokens
    assert pt["attention_mask"].sum(1).tolist() == [len(r) for r in rows]
    with pytest.raises(ValueError, match="padding_side"):
        tok.batch_encode(texts, padding_side="middle")
    with pytest.raises(TypeError, match="list of str"):
        tok.batch_encode("just one")
    with pytest.raises(ValueError, match="return_tensors"):
        tok.batch_encode(texts, return_tensors="tf")


def test_call_like_hf(tok):
    one = tok("Hello")
    assert one == {"input_ids": tok.encode("Hello"), "attention_mask": [1] * len(tok.encode("Hello"))}
    many = tok(["Hi", "Hello there"])
    assert many["input_ids"] == [tok.encode("Hi"), tok.encode("Hello there")]
    assert tok(["Hi", "Hello there"], padding=True) == tok.batch_encode(["Hi", "Hello there"])
    pytest.importorskip("torch")
    assert tok("Hello", return_tensors="pt")["input_ids"].shape == (1, len(tok.encode("Hello")))
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hi", "Hello there"], return_tensors="pt")


def test_apply_chat_template_python_path(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi /no_think"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert text == render_chat(msgs, add_generation_prompt=True, enable_thinking=False)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert ids == tok.encode(text) and tok.decode(ids) == text
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 2
    assert ids[-6:] == tok.encode("<think>\n\n</think>\n\n")
    assert ids.count(tok.think_start_id) == 1 and ids.count(tok.think_end_id) == 1
    # a batch of conversations, and tensors
    batch = tok.apply_chat_template([msgs, msgs[1:]], tokenize=False)
    assert batch == [render_chat(msgs), render_chat(msgs[1:])]
    pytest.importorskip("torch")
    pt = tok.apply_chat_template(msgs, return_tensors="pt")
    assert pt.shape == (1, len(tok.apply_chat_template(msgs)))
    with pytest.raises(TypeError, match="unexpected arguments"):
        tok.apply_chat_template(msgs, enable_thinkin=False)
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template(msgs, use_checkpoint_template=True)


TINY_TEMPLATE = """{% for m in messages %}
[{{ m.role }}] {{ m.content }}
{% endfor %}
{% if add_generation_prompt %}[assistant]{% if not enable_thinking %} (no thinking){% endif %}{% endif %}
{% if tools %}{{ tools | tojson }}{% endif %}{{ suffix or '' }}{{ eos_token }}"""


def test_apply_chat_template_checkpoint_jinja_path(tok_dir, tmp_path):
    t = Qwen3Tokenizer.from_pretrained(tok_dir)
    t.chat_template = TINY_TEMPLATE
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    out = t.apply_chat_template(msgs, use_checkpoint_template=True, tokenize=False,
                                add_generation_prompt=True, enable_thinking=False, suffix="!")
    # trim_blocks drops the newline after a block tag; lstrip_blocks strips indentation before it
    assert out == "[user] Hi\n[assistant] Yo\n[assistant] (no thinking)!<|im_end|>"
    tools = [{"name": "f"}]
    assert t.apply_chat_template(msgs, tools=tools, use_checkpoint_template=True, tokenize=False) \
        == '[user] Hi\n[assistant] Yo\n[{"name": "f"}]<|im_end|>'
    ids = t.apply_chat_template(msgs, use_checkpoint_template=True)
    assert ids[-1] == t.im_end_id
    # the template survives save/load, and chat_template.jinja beside the config wins
    t.save_pretrained(tmp_path)
    assert Qwen3Tokenizer.from_pretrained(tmp_path).chat_template == TINY_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ 'from file' }}")
    assert Qwen3Tokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, use_checkpoint_template=True, tokenize=False) == "from file"


def test_save_load_round_trip(tok, tmp_path):
    paths = tok.save_pretrained(tmp_path / "again")
    assert sorted(os.path.basename(p) for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
    back = Qwen3Tokenizer.from_pretrained(tmp_path / "again")
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert (back.eos_token_ids, back.pad_token_id, back.vocab_size) == (tok.eos_token_ids, tok.pad_token_id, tok.vocab_size)
    cfg = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    decl = {v["content"]: (int(k), v["special"]) for k, v in cfg["added_tokens_decoder"].items()}
    assert decl["<think>"] == (tok.think_start_id, False) and decl["<|im_end|>"] == (tok.im_end_id, True)


def test_eos_from_config_base_model(tok_dir, tmp_path):
    # Qwen3 base checkpoints name <|endoftext|> as eos; chat replies still end at <|im_end|>.
    t = Qwen3Tokenizer.from_pretrained(tok_dir)
    t.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|endoftext|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    b = Qwen3Tokenizer.from_pretrained(tmp_path)
    assert b.eos_token_id == b.pad_token_id == t.pad_token_id
    assert b.eos_token_ids == [t.pad_token_id, t.im_end_id]


def test_tokens_declared_only_in_config_are_added(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["added_tokens"][-1]["content"] == "</think>"
    data["added_tokens"].pop()
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert Qwen3Tokenizer.from_pretrained(tmp_path).think_end_id == tok.think_end_id
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["9999"] = cfg["added_tokens_decoder"].pop(str(tok.think_end_id))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'</think>' as id 9999"):
        Qwen3Tokenizer.from_pretrained(tmp_path)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        Qwen3Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen3Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse .*tokenizer.json"):
        Qwen3Tokenizer.from_pretrained(tmp_path)
    train_qwen_bpe(vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Qwen3Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_without_chat_tokens_is_rejected():
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        Qwen3Tokenizer(bare)
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        Qwen3Tokenizer("not a tokenizer")


def test_build_test_tokenizer_is_deterministic_and_checks_size():
    a = train_qwen_bpe(["some text here", "more text"], vocab_size=300)
    b = train_qwen_bpe(["some text here", "more text"], vocab_size=300)
    assert a.to_str() == b.to_str()
    assert Qwen3Tokenizer(a).vocab_size <= 300
    with pytest.raises(ValueError, match="vocab_size must be >= 282"):
        train_qwen_bpe(vocab_size=100)


def test_same_ids_as_transformers(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), skip_special_tokens=True)
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (tok.eos_token_id, tok.pad_token_id, tok.vocab_size)
