"""train/data.py: sources, mixing, packing with document boundaries, resumable position."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qwen3_fast.train.config import DataConfig, LengthBucket, SourceConfig
from qwen3_fast.train.data import (DatasetsSource, JsonlSource, PackedStream, ParquetSource,
                                   collate, count_targets, global_batch, open_source)

from train_testlib import one_thread, write_jsonl  # noqa: F401 (fixture)


class CharTokenizer:
    """One token per character (ids = ord % 200 + 1), EOS 0: lengths are easy to control."""

    eos_token_id = 0

    def encode(self, text):
        return [ord(c) % 200 + 1 for c in text]

    def __len__(self):
        return 201


def _stream(tmp_path, texts_a, texts_b=None, seq_len=16, **kw):
    sources = [SourceConfig(path=write_jsonl(tmp_path / "a.jsonl", texts_a), weight=1.0)]
    if texts_b is not None:
        sources.append(SourceConfig(path=write_jsonl(tmp_path / "b.jsonl", texts_b),
                                    weight=kw.pop("weight_b", 1.0)))
    cfg = DataConfig(sources=sources, seq_len=seq_len, **kw)
    return PackedStream(cfg, CharTokenizer())


def test_packing_restarts_positions_and_masks_document_starts(tmp_path):
    texts = ["abcde", "xy", "0123456789abcdefghij", "q"]
    stream = _stream(tmp_path, texts, seq_len=12)
    rows = [stream.next_row() for _ in range(3)]
    flat = [t for r in rows for t in r["input_ids"]]
    expect = []
    for t in texts * 2:
        expect += CharTokenizer().encode(t) + [0]
    assert flat == expect[:36]  # the token stream, in order, nothing dropped
    r0 = rows[0]
    assert r0["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]
    assert r0["document_ids"] == [0] * 6 + [1] * 3 + [2] * 3
    assert r0["labels"][0] == r0["labels"][6] == r0["labels"][9] == -100
    assert r0["labels"][1:6] == r0["input_ids"][1:6]
    # the cut document continues in row 1 as a new segment from position 0
    assert rows[1]["position_ids"][:9] == list(range(9)) and rows[1]["labels"][0] == -100
    assert count_targets(rows[:1]) == 12 - 3


def test_mixing_follows_weights_and_seed(tmp_path):
    a, b = ["a"] * 50, ["b"] * 50
    s1 = _stream(tmp_path, a, b, seq_len=2, weight_b=3.0, seed=5)
    firsts = [s1.next_row()["input_ids"][0] for _ in range(800)]
    share_b = firsts.count(CharTokenizer().encode("b")[0]) / len(firsts)
    assert 0.70 < share_b < 0.80
    s2 = _stream(tmp_path, a, b, seq_len=2, weight_b=3.0, seed=5)
    assert [s2.next_row()["input_ids"][0] for _ in range(800)] == firsts


def test_state_dict_resumes_the_exact_rows(tmp_path):
    texts = [f"doc{i}-" + "z" * (i % 7) for i in range(9)]
    s = _stream(tmp_path, texts, ["bb", "ccc"], seq_len=10, weight_b=0.5)
    for _ in range(7):  # into the second epoch of source a
        s.next_row()
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON
    expected = [s.next_row() for _ in range(6)]
    fresh = _stream(tmp_path, texts, ["bb", "ccc"], seq_len=10, weight_b=0.5)
    fresh.load_state_dict(state)
    assert [fresh.next_row() for _ in range(6)] == expected


def test_global_batch_is_rank_independent(tmp_path):
    texts = ["abc", "defgh", "ij"]
    one = _stream(tmp_path, texts, seq_len=4)
    rows, n = global_batch(one, 4, 0, 1)
    parts = []
    for rank in range(2):
        s = _stream(tmp_path, texts, seq_len=4)
        r, n2 = global_batch(s, 2, rank, 2)
        assert n2 == n and s.state_dict() == one.state_dict()
        parts.append(r)
    assert [parts[i % 2][i // 2] for i in range(4)] == rows


def test_length_mix_draws_by_bucket(tmp_path):
    texts = ["s" * 3, "l" * 30, "m" * 12, "l" * 25, "s" * 2]
    stream = _stream(tmp_path, texts, seq_len=8, length_mix=[
        LengthBucket(20, 40, 0.75), LengthBucket(1, 10, 0.25)])
    docs = [stream.next_document() for _ in range(400)]
    assert all(1 <= len(d) < 10 or 20 <= len(d) < 40 for d in docs)  # "m" docs never drawn
    long = sum(len(d) >= 20 for d in docs) / len(docs)
    assert 0.68 < long < 0.82
    bad = _stream(tmp_path, texts, seq_len=8, length_mix=[LengthBucket(100, 200, 1.0)])
    bad.MAX_SKIPS = 50
    with pytest.raises(ValueError, match="no document of 100 <= tokens < 200"):
        bad.next_document()


def test_parquet_source_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = ["one", "two two", "three"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    src = open_source(SourceConfig(path=str(tmp_path / "d.parquet")))
    assert isinstance(src, ParquetSource)
    got = [src.next_text() for _ in range(4)]
    assert got == texts + ["one"] and src.epoch == 1
    state = src.state_dict()
    nxt = src.next_text()
    src2 = open_source(SourceConfig(path=str(tmp_path / "d.parquet")))
    src2.load_state_dict(state)
    assert src2.next_text() == nxt


def test_jsonl_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"content": "x"}\n')
    src = JsonlSource(SourceConfig(path=str(p)))
    assert src.next_text() == "ok"
    with pytest.raises(ValueError, match="bad.jsonl.*no text field 'text'"):
        src.next_text()
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(SourceConfig(path=str(tmp_path / "missing.jsonl")))


def test_datasets_source_over_an_indexable_dataset():
    ds = [{"text": "x"}, {"text": "yy"}]
    src = DatasetsSource(SourceConfig(path="mem", kind="datasets"), dataset=ds)
    assert [src.next_text() for _ in range(3)] == ["x", "yy", "x"] and src.epoch == 1


def test_packed_rows_give_the_per_document_loss_of_separate_runs(one_thread):
    """Three documents in one packed row vs each alone: same per-token losses (fp32)."""
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg).eval()
    docs = [torch.randint(1, 64, (n,)).tolist() for n in (7, 12, 5)]
    pos, did, ids, labels = [], [], [], []
    for i, d in enumerate(docs):
        ids += d
        pos += list(range(len(d)))
        did += [i] * len(d)
        labels += [-100] + d[1:]
    row = collate([{"input_ids": ids, "position_ids": pos, "document_ids": did,
                    "labels": labels}])
    with torch.no_grad():
        out = model(row["input_ids"], position_ids=row["position_ids"],
                    document_ids=row["document_ids"])
        packed_logits = out.logits[0]
        fused_sum = model(row["input_ids"], position_ids=row["position_ids"],
                          document_ids=row["document_ids"], labels=row["labels"],
                          return_logits=False, loss_reduction="sum").loss
        start, total = 0, 0.0
        for d in docs:
            alone = model(torch.tensor([d])).logits[0]
            seg = packed_logits[start:start + len(d)]
            torch.testing.assert_close(seg, alone, rtol=1e-5, atol=1e-5)
            per_doc_packed = F.cross_entropy(seg[:-1], torch.tensor(d[1:]))
            per_doc_alone = model(torch.tensor([d]), labels=torch.tensor([d])).loss
            torch.testing.assert_close(per_doc_packed, per_doc_alone, rtol=1e-5, atol=1e-6)
            total += per_doc_alone.item() * (len(d) - 1)
            start += len(d)
    assert abs(fused_sum.item() - total) < 1e-4 * total
    # without document_ids the packed row attends across documents: not the same
    with torch.no_grad():
        mixed = model(row["input_ids"], position_ids=row["position_ids"]).logits[0]
    assert not torch.allclose(mixed[7:19], packed_logits[7:19], atol=1e-4)


@pytest.mark.slow  # ~14 s here: eager flex_attention pulls in torch._dynamo
def test_document_attention_flex_matches_sdpa_mask():
    """The flex_attention block-mask path (CUDA's) equals the dense-mask SDPA path."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from qwen3_fast.ops.attention import document_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 32, 16)
    k, v = torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    docs = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7, [0] * 32])
    dense = document_attention(q, k, v, docs, True, None, None, use_flex=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = document_attention(q, k, v, docs, True, None, None, use_flex=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
