"""Turn a stream of token bytes into text chunks that are safe to send.

Two things make this more than ``bytes.decode``: a token may end in the middle of a UTF-8 character, and a stop
string may span several tokens. :class:`TextAssembler` holds back exactly what could still turn out to be either,
and never sends text that belongs to a stop string.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class Fed:
    text: str
    stopped: bool


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, piece: bytes) -> Fed:
        """Add one token's bytes; return the text that can be sent now, and whether a stop string was reached."""
        if self.stopped:
            return Fed("", True)
        self._held += self._decoder.decode(piece)
        if not self._stop:
            text, self._held = self._held, ""
            return Fed(text, False)
        cut = self._first_stop(self._held)
        if cut is not None:
            text, self._held = self._held[:cut], ""
            self.stopped = True
            return Fed(text, True)
        keep = self._longest_stop_prefix_suffix(self._held)
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return Fed(text, False)

    def flush(self) -> str:
        """At the end of generation: whatever was held back for a stop string that never came."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _first_stop(self, text: str) -> int | None:
        positions = [pos for pos in (text.find(s) for s in self._stop) if pos >= 0]
        return min(positions) if positions else None

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of some stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
