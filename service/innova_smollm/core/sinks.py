"""Token sinks: how text crosses from the engine thread to the code waiting for it.

:class:`AsyncSink` feeds an asyncio consumer (the HTTP routes) through the loop's :class:`LoopInbox`, so the
engine thread never waits on the event loop and wakes it once per burst of tokens, not once per token.
:class:`BlockingSink` feeds a plain thread (the in-process API, the CLI). Both turn the engine's callbacks into one
stream of :data:`Event` values that ends with a :class:`Finished` or a :class:`Failed`.

A sink made with ``live_text=False`` is for a caller that wants the whole answer at once (a request that is not
streamed, the in-process API). It holds the text on the engine thread and hands it over in one :class:`Text` just
before the end, so the waiting side wakes up three times per answer instead of once per token. Why: each wake-up of
the event loop costs CPU, and on a box with as many decode threads as cores that CPU is taken from the decode.

A streaming sink posts each chunk as it comes; the :class:`LoopInbox` wakes the loop once per burst (one decode step
of every sequence), and the stream hands the client everything that arrived since its last write in one chunk
(:meth:`innova_smollm.core.service.ModelService.open_stream`), so a slow reader or a busy loop costs fewer, larger
writes, never a backlog of small ones.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from innova_smollm.core.types import FinishReason, TokenLogprob


@dataclass(frozen=True)
class Started:
    queue_wait_s: float


@dataclass(frozen=True)
class Text:
    text: str
    #: ``time.monotonic()`` when the engine produced the first character of ``text``: held text arrives at the end,
    #: and the time to the first token must still count from when it was made.
    produced_at: float
    #: The log probabilities of the tokens whose text this completes (streamed answers that asked for them).
    logprobs: tuple[TokenLogprob, ...] | None = None
    choice: int = 0


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    choice: int = 0


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | Text | Finished | Failed


class _SinkBase:
    def __init__(self, *, live_text: bool = True) -> None:
        self._cancel = threading.Event()
        self._submitted_at = time.monotonic()
        self._live_text = live_text
        # Only the engine thread touches the held text (text, finished and failed are all called from it), by choice.
        self._held: dict[int, list[str]] = {}
        self._held_since: dict[int, float] = {}

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, event: Event) -> None:
        raise NotImplementedError

    def started(self) -> None:
        self._put(Started(time.monotonic() - self._submitted_at))

    def text(self, chunk: str, logprobs: Sequence[TokenLogprob] | None = None, choice: int = 0) -> None:
        if self._live_text:
            self._put(Text(chunk, time.monotonic(), None if logprobs is None else tuple(logprobs), choice))
        else:
            # The whole answer's log probabilities come with Finished: the chunks' are not needed.
            self._hold(chunk, choice)

    def _hold(self, chunk: str, choice: int) -> None:
        held = self._held.setdefault(choice, [])
        if not held:
            self._held_since[choice] = time.monotonic()
        held.append(chunk)

    def finished(
        self,
        reason: FinishReason,
        completion_tokens: int,
        logprobs: Sequence[TokenLogprob] | None = None,
        choice: int = 0,
    ) -> None:
        self._hand_over_held_text(choice)
        self._put(Finished(reason, completion_tokens, None if logprobs is None else tuple(logprobs), choice))

    def failed(self, error: Exception) -> None:
        # The text made before the failure still counts: whether anything was produced decides the echo fallback.
        for choice in list(self._held):
            self._hand_over_held_text(choice)
        self._put(Failed(error))

    def _hand_over_held_text(self, choice: int) -> None:
        held = self._held.pop(choice, None)
        if held:
            self._put(Text("".join(held), self._held_since[choice], choice=choice))


class LoopInbox:
    """Carries events from the engine thread to one event loop, waking the loop once per burst.

    Why: the engine hands out one token per running sequence each step, within microseconds. One
    ``call_soon_threadsafe`` per token woke the loop once per token, and on a box with as many decode threads as
    cores every wake-up takes a core from a decode thread, whose partner then spins at llama.cpp's barrier. Here the
    first event of a burst schedules one drain; events posted before the drain runs ride along with it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self._scheduled = False
        #: Events posted and wake-ups made since start (diagnostics and tests).
        self.posted = 0
        self.wakeups = 0

    def post(self, events: asyncio.Queue[Event], event: Event) -> bool:
        """Put ``event`` on the loop's queue ``events``; False once the loop is closed."""
        with self._lock:
            self._pending.append((events, event))
            self.posted += 1
            if self._scheduled:
                return True
            self._scheduled = True
            self.wakeups += 1
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            # The loop is closed and nothing will drain: every later post must fail too, so each sink learns it.
            with self._lock:
                self._pending.clear()
                self._scheduled = False
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for events, event in pending:
            events.put_nowait(event)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def inbox_of(loop: asyncio.AbstractEventLoop) -> LoopInbox:
    """The loop's one inbox, made on first use."""
    with _inboxes_lock:
        inbox = _inboxes.get(loop)
        if inbox is None:
            inbox = _inboxes[loop] = LoopInbox(loop)
        return inbox


class AsyncSink(_SinkBase):
    def __init__(self, loop: asyncio.AbstractEventLoop, *, live_text: bool = True) -> None:
        super().__init__(live_text=live_text)
        self._inbox = inbox_of(loop)
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def _put(self, event: Event) -> None:
        if not self._inbox.post(self._events, event):
            # The loop is closed: nobody is listening any more, so stop generating.
            self._cancel.set()

    async def get(self, timeout: float | None = None) -> Event:
        if timeout is None:
            return await self._events.get()
        return await asyncio.wait_for(self._events.get(), timeout)

    def get_nowait(self) -> Event | None:
        """The next event if one is already here, else None (never waits)."""
        try:
            return self._events.get_nowait()
        except asyncio.QueueEmpty:
            return None


class BlockingSink(_SinkBase):
    def __init__(self, *, live_text: bool = True) -> None:
        super().__init__(live_text=live_text)
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def get(self, timeout: float | None = None) -> Event:
        """Next event; raises ``queue.Empty`` when ``timeout`` passes first."""
        return self._events.get(timeout=timeout)
