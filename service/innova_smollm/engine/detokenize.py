"""Turn a stream of token bytes into text chunks that are safe to send.

Two things make this more than ``bytes.decode``: a token may end in the middle of a UTF-8 character, and a stop
string may span several tokens. :class:`TextAssembler` holds back what could still turn out to be either (all of a
token's text while its last character is incomplete), and never sends text that belongs to a stop string.
"""

from __future__ import annotations

import codecs
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass(frozen=True)
class Fed:
    text: str
    stopped: bool
    #: Characters this token's bytes completed, sent or held back.
    decoded: int = 0
    #: False when the token's bytes end inside a UTF-8 character (the next token completes it).
    whole: bool = True


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
        decoded = self._decoder.decode(piece)
        self._held += decoded
        whole = not self._decoder.getstate()[0]
        if not whole:
            # The token ends inside a character: its text waits for the next token, so that a chunk sent is always
            # the text of whole tokens (what streamed log probabilities pair with, see LogprobQueue).
            keep = len(self._held)
        elif not self._stop:
            text, self._held = self._held, ""
            return Fed(text, False, len(decoded), whole)
        if self._stop:
            cut = self._first_stop(self._held)
            if cut is not None:
                text, self._held = self._held[:cut], ""
                self.stopped = True
                return Fed(text, True, len(decoded), whole)
            if whole:
                keep = self._longest_stop_prefix_suffix(self._held)
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return Fed(text, False, len(decoded), whole)

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


T = TypeVar("T")


class LogprobQueue(Generic[T]):
    """Pairs each token's log probability with the text chunk that carries the token's text, for streaming.

    The assembler sends text late (held for a stop string) and whole characters only (a token may end inside one),
    so a chunk is not one token's text. Each token is counted by the characters it completed; a token that ends inside
    a character travels with the next one, which completes it. A chunk of ``n`` characters takes the tokens whose
    characters all lie within the text sent so far; what is left at the end (tokens a stop string cut
    away, or bytes that never made a character) is never taken: the consumer sends it with the answer's end.
    """

    def __init__(self) -> None:
        #: Entries waiting for their text, each group with the character count at which its text is complete.
        self._waiting: deque[tuple[list[T], int]] = deque()
        self._incomplete: list[T] = []
        self._decoded = 0
        self._sent = 0

    def add(self, entry: T, fed: Fed) -> None:
        """One token, with what feeding its bytes to the assembler made (:class:`Fed`)."""
        self._incomplete.append(entry)
        self._decoded += fed.decoded
        if fed.whole:
            self._waiting.append((self._incomplete, self._decoded))
            self._incomplete = []

    def sent(self, characters: int) -> list[T]:
        """``characters`` more were sent: the entries whose text is now all out."""
        self._sent += characters
        taken: list[T] = []
        while self._waiting and self._waiting[0][1] <= self._sent:
            taken.extend(self._waiting.popleft()[0])
        return taken
