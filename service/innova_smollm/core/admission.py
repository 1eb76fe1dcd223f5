"""Bounded admission: at most ``parallel`` requests run and ``max_queue`` wait; the rest are refused at once.

A request with ``n`` choices takes ``n`` places: it runs as ``n`` of the engine's ``parallel`` sequences, so counting
it once would let more requests wait inside the engine than ``max_queue`` says.

Refusing early, with a Retry-After the caller can act on, beats the usual alternatives: an unbounded line that
lets latency grow without limit (llama.cpp's server), or a new request interrupting a running one
(llama-cpp-python's server). Pure logic, no I/O: thread-safe, so the HTTP routes and the in-process API share it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from innova_smollm.errors import QueueFullError


class Ticket:
    """A place in line; releasing it twice is harmless."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()


class Admission:
    def __init__(self, *, parallel: int, max_queue: int, first_guess_s: float = 4.0) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._in_system = 0
        # A typical request's duration, refined by every answer: what Retry-After is computed from.
        self._typical_s = first_guess_s

    @property
    def in_flight(self) -> int:
        """Places taken by requests running or waiting right now (a request with ``n`` choices takes ``n``)."""
        return self._in_system

    def admit(self, places: int = 1) -> Ticket:
        """Take ``places`` in line, or raise QueueFullError with a Retry-After estimate. Never waits."""
        with self._lock:
            if self._in_system + places > self.parallel + self.max_queue:
                waiting = max(0, self._in_system - self.parallel)
                raise QueueFullError(
                    waiting=waiting, max_queue=self.max_queue, retry_after_s=self.retry_after_s(waiting)
                )
            self._in_system += places
        return Ticket(lambda: self._leave(places))

    def _leave(self, places: int) -> None:
        with self._lock:
            self._in_system -= places

    def retry_after_s(self, waiting: int) -> int:
        # The line drains at about `parallel` requests per typical request duration; 1 to 60 s.
        estimate = self._typical_s * (waiting + 1) / self.parallel
        return max(1, min(60, math.ceil(estimate)))

    def observe_duration(self, seconds: float) -> None:
        self._typical_s = 0.8 * self._typical_s + 0.2 * seconds
