"""Incremental detokenization for the engine: `stream_text`'s rules, one token at a time.

`generate.stream_text` pulls ids from an iterator; the engine instead pushes one id per step per
request, so the same rules (hold back a split UTF-8 character and any text that could begin a
stop string; cut at the first stop string) live here as state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lmscale.engine.generate import _first_stop, _held_back


class TextStream:
    """The text of one request's output, released as it becomes safe to show.

    Args:
        decode: token ids to text.
        stop: stop strings; the output ends before the first one (which is not shown).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0  # characters of the text already released

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token.

        Returns:
            The text newly safe to show, and whether a stop string was reached (the output then
            ends there).
        """
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return "", False
        cut = _first_stop(text, self.stop)
        if cut is not None:
            return self._release(text, cut), True
        return self._release(text, len(text) - _held_back(text, self.stop)), False

    def flush(self) -> str:
        """Everything not yet shown (the output ended without a stop string)."""
        text = self.decode(self.ids)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        piece = text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece
