"""Incremental detokenization: deltas joined equal the full decode (multi-byte characters
split across tokens included), and stop strings are found across token boundaries without
ever streaming text that is later cut."""
from __future__ import annotations

import random

import pytest

from qwen3_fast.generate.textstream import TextStream
from qwen3_fast.tokenizer_train import build_test_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def test_deltas_join_to_full_decode(tok):
    text = "Bonjour, ça va ? 你好，世界！😀 🚀 The quick brown fox. <think>\nhmm\n</think>\n\nok"
    ids = tok.encode(text)
    rnd = random.Random(0)
    sequences = [ids] + [[rnd.randrange(tok.vocab_size) for _ in range(60)] for _ in range(5)]
    for seq in sequences:
        ts = TextStream(tok)
        deltas = [ts.add(t) for t in seq] + [ts.finish()]
        assert "".join(deltas) == tok.decode(seq, skip_special_tokens=True) == ts.text
    # a multi-byte character split over byte tokens is never streamed half-done
    multi = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert multi, "the test text should contain characters split over several tokens"
    ts = TextStream(tok)
    assert all("\ufffd" not in ts.add(t) for t in ids)


def test_stop_string_across_token_boundaries(tok):
    text = "The quick brown fox jumps over the lazy dog. It's 3:45 PM"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    # a stop string that starts inside one token and ends inside a later one
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start:start + len(pieces[2]) + 2]
    assert len(stop) >= 3
    ts = TextStream(tok, stop=[stop, "never"])
    streamed = []
    for t in ids:
        streamed.append(ts.add(t))
        if ts.stopped_by:
            break
    streamed.append(ts.finish())
    assert ts.stopped_by == stop
    assert "".join(streamed) == ts.text == text[:text.find(stop)]
    # held-back prefix of a stop string is released when it turns out not to be one
    ts = TextStream(tok, stop=["fox!"])
    out = "".join(ts.add(t) for t in ids) + ts.finish()
    assert out == text and ts.stopped_by is None
