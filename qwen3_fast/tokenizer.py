"""Qwen3 tokenizer on the `tokenizers` library (no `transformers` needed).

Owns: loading `tokenizer.json` (+ `tokenizer_config.json` / `chat_template.jinja` when
present) from a local directory, the Qwen3 special tokens, encode/decode, batched encoding
with left padding for generation, `apply_chat_template` (our Python renderer in
`qwen3_fast.chat_format`, or the checkpoint's own Jinja template on request) and saving.

Special token ids are looked up by their strings in the loaded vocabulary, never hard-coded:
the real Qwen3 tokenizer has `<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>`
151645, `<think>` 151667, `</think>` 151668, while the small test tokenizers built by
`qwen3_fast.tokenizer_train` carry the same strings at other ids.

Departures from HF `Qwen2TokenizerFast`:
- `vocab_size` counts every id including added tokens (151669 for Qwen3), i.e. HF's
  `len(tokenizer)`; HF's `vocab_size` counts only the BPE vocabulary (151643).
- `padding_side` defaults to "left" (this package pads for generation).
- `eos_token_ids` lists every id that ends a chat reply: the configured eos first, then
  `<|im_end|>` and `<|endoftext|>` (generation_config.json has [151645, 151643]).
- `apply_chat_template` renders in Python by default; the checkpoint's Jinja template is
  used only with `use_checkpoint_template=True`. Tools must be JSON-schema dicts (HF also
  turns Python functions into schemas; we do not).
- Local directories only: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import AddedToken, Tokenizer

from qwen3_fast import chat_format

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The 26 added tokens of Qwen3 in id order (151643...151668), with their `special` flag.
# Non-special ones (tool and think tags, FIM) survive decode(skip_special_tokens=True).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
REQUIRED_TOKENS = (ENDOFTEXT, IM_START, IM_END)


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class Qwen3Tokenizer:
    """Byte-level BPE tokenizer with the Qwen3 special tokens and chat format.

    Build it with `Qwen3Tokenizer.from_pretrained(dir)` or `Qwen3Tokenizer(tokenizers_obj)`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        eos_token: str = IM_END,
        pad_token: str = ENDOFTEXT,
        config: dict | None = None,
        name_or_path: str = "",
    ):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        # Padding/truncation baked into tokenizer.json would silently change encode(); we pad ourselves.
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        self._tok = tokenizer
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self.padding_side = "left"
        self._config = dict(config or {})
        where = f" (tokenizer {name_or_path})" if name_or_path else ""
        for tok in REQUIRED_TOKENS + (eos_token, pad_token):
            if tokenizer.token_to_id(tok) is None:
                raise ValueError(f"token {tok!r} is not in the vocabulary{where}; a Qwen3 tokenizer needs it")
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen3Tokenizer":
        """Load from a local directory holding tokenizer.json (and optionally
        tokenizer_config.json and chat_template.jinja)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer path {path!r} is not a local directory (expected a directory with tokenizer.json; "
                "nothing is downloaded)")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} is missing: {path!r} has no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"cannot parse {tok_file}: {e}") from None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        config = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
        _add_missing_tokens(tokenizer, config, cfg_file)

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):  # transformers >= 4.51 may save it beside the config
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        return cls(
            tokenizer,
            chat_template=template or None,
            eos_token=_token_name(config.get("eos_token")) or IM_END,
            pad_token=_token_name(config.get("pad_token")) or ENDOFTEXT,
            config=config,
            name_or_path=path,
        )

    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and an HF-compatible tokenizer_config.json; return the paths."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tok_file = os.path.join(path, "tokenizer.json")
        cfg_file = os.path.join(path, "tokenizer_config.json")
        self._tok.save(tok_file)
        added = self._tok.get_added_tokens_decoder()
        config = {
            "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
            "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        }
        config.update({k: v for k, v in self._config.items() if k != "chat_template"})
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())
        }
        config["eos_token"], config["pad_token"] = self.eos_token, self.pad_token
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(cfg_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return [tok_file, cfg_file]

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (HF's len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    @property
    def eos_token_id(self) -> int:
        return self._tok.token_to_id(self.eos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = []
        for t in (self.eos_token, IM_END, ENDOFTEXT):
            i = self._tok.token_to_id(t)
            if i not in ids:
                ids.append(i)
        return ids

    @property
    def pad_token_id(self) -> int:
        return self._tok.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> None:
        return None

    @property
    def im_start_id(self) -> int:
        return self._tok.token_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._tok.token_to_id(IM_END)

    @property
    def think_start_id(self) -> int | None:
        """Id of `<think>`; None for tokenizers without it (e.g. Qwen2.5)."""
        return self._tok.token_to_id(chat_format.THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self._tok.token_to_id(chat_format.THINK_END)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text map to their single ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__} (use batch_encode for lists)")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list, tuple, 1-D tensor/array, or one int)."""
        ids = _as_id_list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([_as_id_list(s) for s in _as_id_list(sequences)],
                                      skip_special_tokens=skip_special_tokens)

    def batch_encode(
        self,
        texts: list[str],
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = False,
    ) -> dict:
        """Encode a batch and pad it to the longest sequence with `pad_token_id`.

        Returns {"input_ids", "attention_mask"} as lists of lists, or torch tensors
        ([B, T], int64) with `return_tensors="pt"`. Left padding (the default) keeps every
        prompt's last token in the last column, which generation needs."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("batch_encode takes a list of str (use encode for one text)")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        width = max((len(r) for r in rows), default=0)
        ids, mask = [], []
        for r in rows:
            pad = width - len(r)
            if side == "left":
                ids.append([self.pad_token_id] * pad + r)
                mask.append([0] * pad + [1] * len(r))
            else:
                ids.append(r + [self.pad_token_id] * pad)
                mask.append([1] * len(r) + [0] * pad)
        return _to_tensors({"input_ids": ids, "attention_mask": mask}, return_tensors)

    def __call__(self, text, add_special_tokens: bool = False, padding: bool | str = False,
                 padding_side: str | None = None, return_tensors: str | None = None) -> dict:
        """HF-style call: one str -> {"input_ids": [...], "attention_mask": [...]}; a list ->
        lists per text, padded when `padding` is set. Tensors ("pt") always come batched."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
            if return_tensors:
                out = _to_tensors({k: [v] for k, v in out.items()}, return_tensors)
            return out
        texts = list(text)
        if padding:
            return self.batch_encode(texts, padding_side, return_tensors, add_special_tokens)
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if return_tensors and len({len(r) for r in rows}) > 1:
            raise ValueError("texts have different lengths; pass padding=True to get tensors")
        return _to_tensors({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}, return_tensors)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        tokenize: bool = True,
        use_checkpoint_template: bool = False,
        return_tensors: str | None = None,
        **kwargs: Any,
    ):
        """Render a conversation (or a list of conversations) in the Qwen3 chat format.

        tokenize=False returns the string, True the token ids (a [1, T] / [B, T] left-padded
        tensor with return_tensors="pt"). With use_checkpoint_template=True the checkpoint's
        `chat_template` is rendered instead (sandboxed Jinja, HF semantics); extra keyword
        arguments become template variables there, and are an error for the Python renderer.
        """
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batched else [messages]
        if use_checkpoint_template:
            if not self.chat_template:
                raise ValueError(
                    f"use_checkpoint_template=True but tokenizer {self.name_or_path or '(in memory)'} has no "
                    "chat_template (none in tokenizer_config.json or chat_template.jinja)")
            variables = {"eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": None, **kwargs}
            texts = [chat_format.render_jinja(self.chat_template, c, tools, add_generation_prompt,
                                              enable_thinking=enable_thinking, **variables) for c in convs]
        else:
            if kwargs:
                raise TypeError(f"apply_chat_template got unexpected arguments {sorted(kwargs)} "
                                "(template variables only apply with use_checkpoint_template=True)")
            texts = [chat_format.render_chat(c, tools, add_generation_prompt, enable_thinking) for c in convs]
        if not tokenize:
            return texts if batched else texts[0]
        if return_tensors:
            return self.batch_encode(texts, return_tensors=return_tensors)["input_ids"]
        ids = [self.encode(t) for t in texts]
        return ids if batched else ids[0]

    def __repr__(self) -> str:
        return (f"Qwen3Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")


def _add_missing_tokens(tokenizer: Tokenizer, config: dict, cfg_file: str) -> None:
    """Add tokens listed in added_tokens_decoder but absent from tokenizer.json (as HF does);
    their ids must come out as declared, else the two files disagree."""
    decl = config.get("added_tokens_decoder") or {}
    for key, spec in sorted(decl.items(), key=lambda kv: int(kv[0])):
        content = _token_name(spec)
        if not content or tokenizer.token_to_id(content) is not None:
            continue
        special = bool(spec.get("special", True)) if isinstance(spec, dict) else True
        tok = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([tok])
        got = tokenizer.token_to_id(content)
        if got != int(key):
            raise ValueError(f"{cfg_file} declares {content!r} as id {key}, but tokenizer.json would give it id {got}")


def _as_id_list(ids) -> list:
    if hasattr(ids, "tolist"):  # torch tensor / numpy array
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return list(ids)


def _to_tensors(batch: dict, return_tensors: str | None) -> dict:
    if return_tensors is None:
        return batch
    if return_tensors == "pt":
        import torch

        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if return_tensors == "np":
        import numpy as np

        return {k: np.asarray(v, dtype=np.int64) for k, v in batch.items()}
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
