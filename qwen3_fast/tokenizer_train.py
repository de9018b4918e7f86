"""Small Qwen-style tokenizers for tests and demos (no real tokenizer can be downloaded here).

Owns: `train_qwen_bpe` (a byte-level BPE with the Qwen2/Qwen3 pipeline: NFC normalizer, the
Qwen2 split regex, byte-level pre-tokenizer/decoder, the 26 Qwen3 added tokens appended after
the BPE vocabulary) and `build_test_tokenizer`, which wraps it in a `Qwen3Tokenizer` and
optionally saves `tokenizer.json` + `tokenizer_config.json`.

How it departs from the real Qwen3 tokenizer: the BPE vocabulary is tiny and learned from the
given texts, so ids differ (the added tokens sit right after the BPE vocabulary instead of at
151643...151668); the added tokens keep Qwen3's `special` flags (the `<|...|>` tokens are
special, the tool/think/FIM tags are not) and all are matched whole, never split by BPE.
Training is deterministic for a given corpus and vocabulary size.

Run: `python -m qwen3_fast.tokenizer_train OUT_DIR [VOCAB_SIZE]` writes a tokenizer directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qwen3_fast.tokenizer import QWEN3_ADDED_TOKENS, Qwen3Tokenizer

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A little of everything the tests and demos render: chat words, reasoning, JSON tool calls,
# code, digits, non-Latin scripts and emoji (so byte-level fallback is exercised).
DEFAULT_CORPUS: tuple[str, ...] = (
    "system user assistant tool You are a helpful assistant. Please answer the question.",
    "Hello! How can I help you today? What is the weather like in Paris?",
    "Let me think step by step. First, 2 + 2 = 4. Then 4 * 3 = 12. So the answer is 12.",
    "Okay, the user wants to know the capital of France. The capital of France is Paris.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"type": "function", "function": {"name": "search", "description": "Search the web", '
    '"parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}',
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        continue\n    total += i\n",
    "The quick brown fox jumps over the lazy dog. It's 3:45 PM and we've got 1,234 items.",
    "I'm sure they'll say it's fine; you'd think we're done, but there's more to do.",
    "Qwen3 supports thinking and non-thinking modes: /think and /no_think switch between them.",
    "你好，世界！今天天气怎么样？我们来一步一步地思考。",
    "Bonjour, ça va ? Größe, naïve café, Ελληνικά, русский язык. 😀 🚀",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -42 1e-6",
    "Tool results: temperature 21 degrees, sunny, humidity 40%.\n\nDone.\n",
)


def train_qwen_bpe(texts: Iterable[str] | None = None, vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE with the Qwen2/Qwen3 pipeline.

    vocab_size counts every id including the 26 added tokens (at most; a small corpus may
    yield fewer merges). It must leave room for the 256 byte tokens."""
    n_added = len(QWEN3_ADDED_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(
            f"vocab_size must be >= {256 + n_added} (256 bytes + {n_added} added tokens), got {vocab_size}")
    texts = list(DEFAULT_CORPUS if texts is None else texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be an iterable of str")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Appended after the BPE vocabulary, in Qwen3's order, so their relative order matches.
    for content, special in QWEN3_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return tok


def build_test_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    save_dir: str | os.PathLike | None = None,
    chat_template: str | None = None,
) -> Qwen3Tokenizer:
    """A small `Qwen3Tokenizer` trained on `texts` (a built-in mixed corpus by default).

    With `save_dir`, tokenizer.json and tokenizer_config.json (plus `chat_template` when
    given) are written there so `Qwen3Tokenizer.from_pretrained` and transformers can load it.
    """
    tok = Qwen3Tokenizer(train_qwen_bpe(texts, vocab_size), chat_template=chat_template,
                         name_or_path=os.fspath(save_dir) if save_dir is not None else "")
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m qwen3_fast.tokenizer_train OUT_DIR [VOCAB_SIZE]")
    t = build_test_tokenizer(vocab_size=int(sys.argv[2]) if len(sys.argv) == 3 else 512, save_dir=sys.argv[1])
    print(f"wrote {sys.argv[1]}: {t}")
