"""Token sinks: how text crosses from the engine thread to the code waiting for it.

:class:`AsyncSink` feeds an asyncio consumer (the HTTP routes) with one ``call_soon_threadsafe`` per event, so the
engine thread never waits on the event loop. :class:`BlockingSink` feeds a plain thread (the in-process API, the
CLI). Both turn the engine's callbacks into one stream of :data:`Event` values that ends with a :class:`Finished`
or a :class:`Failed`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from innova_smollm.generation import FinishReason


@dataclass(frozen=True)
class Started:
    queue_wait_s: float


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | Text | Finished | Failed


class _SinkBase:
    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._submitted_at = time.monotonic()

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, event: Event) -> None:
        raise NotImplementedError

    def started(self) -> None:
        self._put(Started(time.monotonic() - self._submitted_at))

    def text(self, chunk: str) -> None:
        self._put(Text(chunk))

    def finished(self, reason: FinishReason, completion_tokens: int) -> None:
        self._put(Finished(reason, completion_tokens))

    def failed(self, error: Exception) -> None:
        self._put(Failed(error))


class AsyncSink(_SinkBase):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def _put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            # The loop is closed: nobody is listening any more, so stop generating.
            self._cancel.set()

    async def get(self, timeout: float | None = None) -> Event:
        if timeout is None:
            return await self._events.get()
        return await asyncio.wait_for(self._events.get(), timeout)


class BlockingSink(_SinkBase):
    def __init__(self) -> None:
        super().__init__()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def get(self, timeout: float | None = None) -> Event:
        """Next event; raises ``queue.Empty`` when ``timeout`` passes first."""
        return self._events.get(timeout=timeout)
