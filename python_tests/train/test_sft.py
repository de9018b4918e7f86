"""SFT recipe (train/sft.py, train/sft_data.py): labels on the final reply only, the engine's
exact tokens, whole-sample packing, exact resume, and the pretrain -> cold start -> fusion
chain through HF checkpoints (the last stage through the ``qwen3-fast train sft`` CLI)."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

from qwen3_fast.chat_format import EMPTY_THINK, parse_reasoning, render_chat
from qwen3_fast.train.checkpoint import latest_checkpoint
from qwen3_fast.train.config import ConfigError, DataConfig, SourceConfig, load_config
from qwen3_fast.train.data import IGNORE_INDEX, count_targets, load_tokenizer
from qwen3_fast.train.sft import STAGES, ColdStartConfig, FusionConfig
from qwen3_fast.train.sft_data import ChatPackedStream, split_reply, tokenize_chat

from train_testlib import RECIPES, metrics, one_thread, tiny_config  # noqa: F401 (fixture)

THINK = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "What is 2 plus 3?"},
         {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "5."}]
NO_THINK = [{"role": "user", "content": "Say hi. /no_think"},
            {"role": "assistant", "reasoning_content": "", "content": "Hi!"}]
MULTI = [{"role": "user", "content": "Add 1 and 1."},
         {"role": "assistant", "reasoning_content": "1 + 1 = 2.", "content": "2."},
         {"role": "user", "content": "Now say bye. /no_think"},
         {"role": "assistant", "content": "Bye."}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("test")


def _offsets(tok, ids):
    """Character span of each token in the decoded text (the test data is ASCII)."""
    spans, pos = [], 0
    for t in ids:
        n = len(tok.decode([t]))
        spans.append((pos, pos + n))
        pos += n
    return spans


@pytest.mark.parametrize("messages", [THINK, NO_THINK, MULTI], ids=["think", "no_think",
                                                                     "multi_turn"])
def test_labels_cover_exactly_the_final_reply(tok, messages):
    ids, labels = tokenize_chat(messages, tok)
    text = render_chat(messages)
    assert tok.decode(ids) == text and ids == tok.encode(text)
    prompt, reply, _ = split_reply(messages)
    start, end = len(prompt), len(prompt) + len(reply)
    r = messages[-1].get("reasoning_content") or ""
    think = f"<think>\n{r}\n</think>\n\n" if r else EMPTY_THINK
    assert reply == think + messages[-1]["content"] + "<|im_end|>"
    for i, (a, b) in enumerate(_offsets(tok, ids)):  # token by token against the template
        inside = start <= a and b <= end
        assert not (a < start < b or a < end < b), "a token straddles the reply boundary"
        assert labels[i] == (ids[i] if inside else IGNORE_INDEX), (i, text[a:b])
    assert tok.decode([y for y in labels if y != IGNORE_INDEX]) == reply
    # no label on any system/user turn or on earlier assistant turns (history)
    assert "<|im_start|>user" not in reply and "<|im_start|>system" not in reply
    if messages is MULTI:
        assert "2." not in reply and "1 + 1" not in text  # history: reasoning stripped


def test_training_text_is_the_engine_prompt_plus_reply(tok, one_thread):
    from qwen3_fast import LLM
    from qwen3_fast.generate.params import SamplingParams
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config.from_name(
        "Qwen3-0.6B", vocab_size=512, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256))
    llm = LLM.from_model(model, tok, max_seq_len=256, max_batch_size=2)
    greedy = SamplingParams(temperature=0, max_new_tokens=1)
    for messages in (THINK, NO_THINK, MULTI):
        ids, labels = tokenize_chat(messages, tok)
        first = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        reply_ids = [y for y in labels if y != IGNORE_INDEX]
        assert labels[first:first + len(reply_ids)] == reply_ids  # one contiguous reply
        # thinking mode: the engine's prompt is everything before the reply ...
        out = llm.chat(messages[:-1], enable_thinking=True, sampling=greedy)
        assert out.prompt_token_ids == ids[:first]
        # ... and the reply, read back as the engine reads its output, is the message
        reasoning, content = parse_reasoning(tok.decode(reply_ids))
        assert content == messages[-1]["content"]
        assert reasoning == (messages[-1].get("reasoning_content") or "")
        assert reply_ids[-1] == tok.im_end_id and ids[first + len(reply_ids):] == \
            tok.encode("\n")
        # hard switch (enable_thinking=False): the empty think block moves into the prompt
        if not reasoning:
            out = llm.chat(messages[:-1], enable_thinking=False, sampling=greedy)
            empty = tok.encode(EMPTY_THINK)
            assert out.prompt_token_ids == ids[:first] + empty
            assert reply_ids[:len(empty)] == empty
            assert tok.decode(out.prompt_token_ids + reply_ids[len(empty):]) + "\n" == \
                render_chat(messages)


def _write(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        for m in samples:
            f.write(json.dumps({"messages": m}) + "\n")
    return str(path)


def _qa(q, a, r=""):
    return [{"role": "user", "content": q},
            {"role": "assistant", "reasoning_content": r, "content": a}]


def _stream(tmp_path, tok, seq_len=64, weight_b=None, **kw):
    a = [_qa(f"q{i}", f"a{i}", "r" * (i % 4)) for i in range(7)]
    sources = [SourceConfig(path=_write(tmp_path / "a.jsonl", a))]
    if weight_b is not None:
        b = [_qa(f"Q{i}?", f"B{i}") for i in range(3)]
        sources.append(SourceConfig(path=_write(tmp_path / "b.jsonl", b), weight=weight_b))
    return ChatPackedStream(DataConfig(sources=sources, seq_len=seq_len, seed=3), tok, **kw)


def test_packing_keeps_whole_samples_with_boundaries(tmp_path, tok):
    stream = _stream(tmp_path, tok, seq_len=64, weight_b=1.0)
    expected = []  # the samples in stream order, from an identical stream
    twin = _stream(tmp_path, tok, seq_len=64, weight_b=1.0)
    for _ in range(30):
        expected.append(twin.next_sample())
    k = pads = multi = 0
    for _ in range(8):
        row = stream.next_row()
        multi += row["document_ids"][-1] >= 2
        assert all(len(v) == 64 for v in row.values())
        docs = row["document_ids"]
        assert docs == sorted(docs) and docs[0] == 0
        for d in range(docs[-1] + 1):
            idx = [i for i, x in enumerate(docs) if x == d]
            assert row["position_ids"][idx[0]:idx[-1] + 1] == list(range(len(idx)))
            seg_ids = [row["input_ids"][i] for i in idx]
            seg_labels = [row["labels"][i] for i in idx]
            if set(seg_ids) == {tok.pad_token_id}:  # padding: the row's last segment
                assert d == docs[-1] and len(seg_ids) < len(expected[k][0])
                assert set(seg_labels) == {IGNORE_INDEX}  # no loss
                pads += 1
                continue
            assert (seg_ids, seg_labels) == expected[k]  # a whole sample, never split
            assert seg_labels[0] == IGNORE_INDEX
            k += 1
    assert stream.samples == k and stream.dropped == 0
    assert pads >= 1 and multi >= 1  # both padded rows and rows of several samples occurred


def test_weighted_mix_of_sources(tmp_path, tok):
    stream = _stream(tmp_path, tok, seq_len=512, weight_b=3.0)
    firsts = []
    for _ in range(200):
        ids, labels = stream.next_sample()
        firsts.append(tok.decode(ids).startswith("<|im_start|>user\nQ"))  # source b
    assert 0.65 < sum(firsts) / len(firsts) < 0.85


def test_overlong_samples_are_dropped_with_a_warning_or_truncated(tmp_path, tok):
    long_one = _qa("long?", "x " * 80, "think " * 40)
    path = _write(tmp_path / "l.jsonl", [_qa("a", "b"), long_one, _qa("c", "d")])
    cfg = DataConfig(sources=[SourceConfig(path=path)], seq_len=48, seed=0)
    stream = ChatPackedStream(cfg, tok)
    with pytest.warns(RuntimeWarning, match="dropped a .*-token sample longer than"):
        rows = [stream.next_row() for _ in range(3)]
    assert stream.dropped >= 1 and stream.truncated == 0
    n_long = len(tokenize_chat(long_one, tok)[0])
    assert n_long > 48
    for row in rows:  # only the two short samples ever appear (each whole)
        assert tok.decode(row["input_ids"]).count("<|im_start|>assistant") <= 2
    trunc = ChatPackedStream(cfg, tok, overlong="truncate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = [trunc.next_row() for _ in range(3)]
    assert trunc.truncated >= 1 and trunc.dropped == 0
    cut = [r for r in rows if "long?" in tok.decode(r["input_ids"])]
    assert cut and cut[0]["document_ids"] == [0] * 48  # the cut sample fills its row
    assert any(y != IGNORE_INDEX for y in cut[0]["labels"])
    with pytest.raises(ValueError, match="overlong"):
        ChatPackedStream(cfg, tok, overlong="cut")


def test_resume_continues_the_exact_row_sequence(tmp_path, tok):
    full = _stream(tmp_path, tok, seq_len=60, weight_b=0.7)
    rows = [full.next_row() for _ in range(9)]
    for stop in (1, 4):
        first = _stream(tmp_path, tok, seq_len=60, weight_b=0.7)
        for _ in range(stop):
            first.next_row()
        state = json.loads(json.dumps(first.state_dict()))  # goes through a JSON checkpoint
        assert state["pending"] is not None  # resuming mid-sample-queue is covered
        resumed = _stream(tmp_path, tok, seq_len=60, weight_b=0.7)
        resumed.load_state_dict(state)
        assert [resumed.next_row() for _ in range(9 - stop)] == rows[stop:]


def test_parquet_and_datasets_sources_read_messages(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwen3_fast.train.data import DatasetsSource

    samples = [THINK, NO_THINK, MULTI]
    cfg = DataConfig(sources=[SourceConfig(path=_write(tmp_path / "c.jsonl", samples))],
                     seq_len=128)
    want = [ChatPackedStream(cfg, tok).next_row() for _ in range(3)]
    pq.write_table(pa.table({"messages": samples}), tmp_path / "c.parquet")  # structs
    pcfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "c.parquet"))], seq_len=128)
    assert [ChatPackedStream(pcfg, tok).next_row() for _ in range(3)] == want
    src = SourceConfig(path="mem", kind="datasets", messages_field="conv")
    ds = DatasetsSource(src, dataset=[{"conv": m} for m in samples])
    dcfg = DataConfig(sources=[src], seq_len=128)
    assert [ChatPackedStream(dcfg, tok, sources=[ds]).next_row() for _ in range(3)] == want
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "plain"}) + "\n")
    bad = DataConfig(sources=[SourceConfig(path=str(tmp_path / "t.jsonl"))])
    with pytest.raises(ValueError, match="no messages field 'messages'"):
        ChatPackedStream(bad, tok).next_row()


def test_bad_samples_and_configs_are_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="must end with an assistant message"):
        tokenize_chat([{"role": "user", "content": "hi"}], tok)
    path = _write(tmp_path / "bad.jsonl", [[{"role": "user", "content": "hi"}]])
    stream = ChatPackedStream(DataConfig(sources=[SourceConfig(path=path)], seq_len=32), tok)
    with pytest.raises(ValueError, match="bad.jsonl.*assistant"):
        stream.next_row()
    cfg = load_config(str(RECIPES / "sft_cold_start_tiny.yaml"), [], stages=STAGES)
    assert isinstance(cfg, ColdStartConfig) and cfg.data.sources[0].path.endswith(".jsonl")
    fusion = load_config(str(RECIPES / "sft_fusion_tiny.yaml"), [], stages=STAGES)
    assert isinstance(fusion, FusionConfig)
    defaults = load_config(None, ["data.sources=[{path: x.jsonl}]"], stages=STAGES)
    assert defaults.stage == "cold_start" and defaults.optim.lr == 2e-5
    assert defaults.optim.schedule == "cosine" and defaults.optim.warmup_steps == 10
    with pytest.raises(ConfigError, match="overlong: expected 'drop' or 'truncate'"):
        load_config(str(RECIPES / "sft_cold_start_tiny.yaml"), ["overlong=cut"], stages=STAGES)


def test_pretrain_cold_start_fusion_chain(tmp_path, one_thread):
    from qwen3_fast.cli import main as cli_main
    from qwen3_fast.train.sft import run
    from qwen3_fast.train.trainer import train

    pre = train(tiny_config("s1_tiny", tmp_path / "pre", "steps=4", "save_every=0",
                            "optim.warmup_steps=1"))
    assert pre[-1] < pre[0]
    scratch_loss = 6.0  # ~ln(512): the first loss of an untrained tiny model
    cfg = load_config(str(RECIPES / "sft_cold_start_tiny.yaml"), [
        f"output_dir={tmp_path / 'cold'}", "progress=false", "steps=6", "save_every=3",
        f"model.init_from={tmp_path / 'pre' / 'model'}",
        f"data.tokenizer={tmp_path / 'pre' / 'model'}"], stages=STAGES)
    # stopped after step 3 and resumed from its checkpoint (the chat stream's state)
    cold = run(dataclasses.replace(cfg, stop_after=3)) + run(cfg)
    assert len(cold) == 6 and cold[-1] < cold[0] - 0.3  # the SFT loss decreases
    assert cold[0] < scratch_loss  # it starts from the pre-trained weights
    rec = metrics(tmp_path / "cold")
    assert all(r["targets"] < r["tokens"] // 2 for r in rec)  # loss on replies only
    fresh = cfg.build_stream(load_tokenizer(cfg.data.tokenizer))
    rows = cfg.micro_batch_size * cfg.grad_accum
    assert [r["targets"] for r in rec] == [  # the resumed run read the same rows ...
        count_targets([fresh.next_row() for _ in range(rows)]) for _ in range(6)]
    with open(os.path.join(latest_checkpoint(cfg.output_dir), "trainer_state.json")) as f:
        assert json.load(f)["data"] == fresh.state_dict()  # ... and continued, not restarted
    rc = cli_main(["train", "sft", "--config", str(RECIPES / "sft_fusion_tiny.yaml"),
                   f"output_dir={tmp_path / 'fusion'}", "steps=3", "save_every=0",
                   "progress=false", f"model.init_from={tmp_path / 'cold' / 'model'}"])
    assert rc == 0
    fusion = [r["loss"] for r in metrics(tmp_path / "fusion")]
    assert len(fusion) == 3
    assert fusion[0] < cold[0]  # it continues the cold start's model
    assert (tmp_path / "fusion" / "model" / "model.safetensors").exists()
    assert (tmp_path / "fusion" / "model" / "tokenizer.json").exists()
