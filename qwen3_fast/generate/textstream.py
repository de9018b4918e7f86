"""Incremental detokenization and stop strings for one generated sequence.

:class:`TextStream` turns token ids, one at a time, into text deltas such that
(1) the deltas joined equal ``tokenizer.decode(ids, skip_special_tokens=True)`` of the ids fed
so far (once :meth:`TextStream.finish` flushes), cut at the first stop string;
(2) no delta contains an incomplete UTF-8 character (a token boundary may split one: the
decoder then ends in U+FFFD and the text is held back until the next token completes it);
(3) no delta contains text that may still turn out to be the start of a stop string (held back
until it cannot), so streamed text never has to be taken back.

Decoding re-reads only a short window of ids (from the last point where the text was
complete), so the cost per token does not grow with the length of the reply.
"""
from __future__ import annotations

from typing import Optional, Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the last complete piece of text
        self._read = 0
        self.text = ""  # decoded so far (complete characters), before stop-string cutting
        self.emitted = 0  # characters of self.text handed out as deltas
        self.stopped_by: Optional[str] = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Feed one token id; returns the new text that is safe to show (may be "")."""
        if self.stopped_by is not None:
            return ""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush held-back text at the end of the sequence; returns the last delta."""
        if self.stopped_by is None and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix:self._read])
            after = self._decode(self.ids[self._prefix:])
            self.text += after[len(before):]
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and self.stopped_by is None:
            # a stop string may start up to len(stop) - 1 characters before the new text
            start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [(self.text.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text, self.stopped_by = self.text[:i], s
        end = len(self.text)
        if self.stop and self.stopped_by is None and not final:
            end -= self._held_suffix()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _held_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
