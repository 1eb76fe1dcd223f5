"""Saved KV states of sequences, in host memory: the second tier of the engine's prompt cache.

The first tier is the KV cache itself: an idle sequence id keeps its cells. There are only ``SMOLLM_PARALLEL`` ids,
so under load an idle sequence is taken by the next job and its cells are cut to the prefix that job shares. Before
they go, the engine copies the sequence's KV state (``llama_state_seq_get_data``) into this store; a later prompt
that starts the same way (the same question again, the next turn of a chat) gets those cells back with
``llama_state_seq_set_data``, a copy of a few megabytes, instead of decoding its prefix again. llama-server does the
same with its ``--cache-ram``.

Warm prompts (SMOLLM_WARM_PROMPTS) are states saved at start-up and *pinned*: they are looked up like the others but
never dropped, and their bytes come out of the budget first.

This module is plain bookkeeping, with no llama.cpp in it: a byte budget, least recently used first out, and the
longest common prefix as the lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class SavedState:
    """The tokens a sequence's cells held, positions 0 to ``len(tokens) - 1``, and llama.cpp's ``size`` bytes for
    them in ``data`` (the buffer llama.cpp wrote, kept as it is to spare a copy of megabytes)."""

    tokens: tuple[int, ...]
    data: object
    size: int


class SavedStates:
    """At most ``limit_bytes`` of saved sequence states: pinned ones for good, the others dropped least recently used
    first from what the pinned ones leave."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._states: OrderedDict[tuple[int, ...], SavedState] = OrderedDict()
        self._pinned: dict[tuple[int, ...], SavedState] = {}
        self._bytes = 0
        self._pinned_bytes = 0

    @property
    def limit_bytes(self) -> int:
        """The most one state that may be dropped can take: the budget less the pinned states."""
        return self._limit - self._pinned_bytes

    @property
    def bytes_used(self) -> int:
        return self._bytes + self._pinned_bytes

    def __len__(self) -> int:
        return len(self._states) + len(self._pinned)

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether a saved state already holds ``tokens`` (or more after them): saving them again would add nothing."""
        key = tuple(tokens)
        return any(saved[: len(key)] == key for saved in (*self._states, *self._pinned))

    def pin(self, state: SavedState) -> bool:
        """Keep ``state`` for good; returns False when the budget cannot hold it beside the pinned ones."""
        if not state.tokens or self._pinned_bytes + state.size > self._limit:
            return False
        old = self._pinned.pop(state.tokens, None)
        self._pinned_bytes -= old.size if old is not None else 0
        self._pinned[state.tokens] = state
        self._pinned_bytes += state.size
        while self._states and self._bytes > self.limit_bytes:
            _, oldest = self._states.popitem(last=False)
            self._bytes -= oldest.size
        return True

    def add(self, state: SavedState) -> bool:
        """Keep ``state`` as the most recently used; returns False when it alone is larger than the budget.

        A saved state whose tokens ``state`` starts with is dropped: ``state`` answers every prompt it answered.
        """
        if state.size > self.limit_bytes or not state.tokens:
            return False
        for tokens in [saved for saved in self._states if state.tokens[: len(saved)] == saved]:
            self._bytes -= self._states.pop(tokens).size
        self._states[state.tokens] = state
        self._bytes += state.size
        while self._bytes > self.limit_bytes:
            _, oldest = self._states.popitem(last=False)
            self._bytes -= oldest.size
        return True

    def best_for(self, prompt: Sequence[int]) -> tuple[SavedState | None, int]:
        """The saved state sharing the longest prefix with ``prompt`` and that prefix's length (0 and None: none).

        The prompt's last token never counts: its logits pick the first answer token, so it is always decoded.
        """
        best: SavedState | None = None
        best_length = 0
        limit = len(prompt) - 1
        for tokens, state in (*self._states.items(), *self._pinned.items()):
            length = common_prefix_length(tokens, prompt, limit)
            if length > best_length:
                best, best_length = state, length
        return best, best_length

    def used(self, state: SavedState) -> None:
        """Mark ``state`` as the most recently used."""
        if state.tokens in self._states:
            self._states.move_to_end(state.tokens)

    def drop(self, state: SavedState) -> None:
        """Forget ``state`` (one that could not be restored); a pinned state stays."""
        saved = self._states.pop(state.tokens, None)
        if saved is not None:
            self._bytes -= saved.size


def common_prefix_length(first: Sequence[int], second: Sequence[int], limit: int | None = None) -> int:
    """How many leading tokens ``first`` and ``second`` share, counting at most ``limit``."""
    length = min(len(first), len(second))
    if limit is not None:
        length = max(min(length, limit), 0)
    for index in range(length):
        if first[index] != second[index]:
            return index
    return length
