"""How many threads llama.cpp decodes with, chosen from the decode steps the engine times.

Why this exists: llama.cpp's threads meet at a spinning barrier hundreds of times per token. When something else
takes a core (another systemd service in its own cgroup, a neighbour on a shared-vCPU host), one thread spins at
the barrier while its partner waits to be scheduled, and decoding slows by orders of magnitude instead of by the
share of CPU lost (llama-server and llama-cpp-python collapse the same way; docs/performance.md has the figures).
Fewer threads than cores decode at nearly full speed under the same load.

So the governor keeps a ladder of thread counts (the configured count, halved down to 1) and compares them side by
side while the engine decodes: now and then it runs a few steps one rung away, and moves when that rung is clearly
faster for the same batch shape than both the steps just before the probe and a few steps back home right after it.
The second look is there because home's steps can be slow for a moment (the first steps after an idle spell, another
process warming up), and against those alone a rung would sometimes "win" on an idle box and cost the moves' slow
steps. A losing rung is tried again after a doubling interval (up to
a minute), so on an idle box the probes cost a few steps a minute. A step far slower than the recent ones starts a
probe of the bottom rung (one thread) at once, so a collapse is left within seconds, and the up-probes then climb
back to the best rung. Coming back does not wait for the doubling interval when the steps on a lower rung get
clearly faster than when the governor moved there: the other process has likely stopped, so more threads are tried
at once. Only pure decode steps (no prompt tokens in the batch) are compared, keyed by how many tokens the step
decodes, because steps of different shapes take different times.

Pure logic with an injectable clock: the engine times its steps and applies what :meth:`ThreadGovernor.step_done`
returns with ``llama_set_n_threads`` (this module imports no llama_cpp).
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from innova_smollm.settings import Settings

log = logging.getLogger(__name__)

#: Steps run on the probed rung before it is compared with home; as many again back home confirm a win.
PROBE_STEPS = 3
#: A probe wins only when its median step takes less than this share of home's: noise never moves the threads.
WIN_RATIO = 0.85
#: A probe step this many times slower than home's steps is a clear loss, ended at once (it may be collapsing);
#: a confirming step this many times slower than the probe's confirms the win at once (home may be collapsing).
LOSS_RATIO = 2.0
#: A step this many times slower than the median of the recent ones (and at least SLOW_STEP_MIN_S) is a collapse.
SLOWDOWN_RATIO = 4.0
SLOW_STEP_MIN_S = 0.05
#: Recent steps kept per (rung, batch shape); home's reference is the median of the last REFERENCE_STEPS of them.
HISTORY = 8
REFERENCE_STEPS = 3
#: Steps on a lower rung this much faster than when the governor moved there: try more threads without waiting.
EASED_RATIO = 0.8
FIRST_PROBE_AFTER_S = 2.0
MAX_PROBE_INTERVAL_S = 60.0


@dataclass(frozen=True)
class ThreadCounts:
    """Threads for single-token steps and for batches of several tokens (``llama_set_n_threads``)."""

    decode: int
    batch: int


@dataclass
class _Probe:
    rung: int
    home: int
    shape: int
    reference_s: float
    steps: int = 0
    #: Steps of other shapes seen meanwhile; too many and the probe ends without a verdict.
    foreign_steps: int = 0
    #: Set when the probed rung beat the steps before the probe: its median step, which must also beat the
    #: confirming steps now run back home.
    won_s: float | None = None
    confirming: list[float] = field(default_factory=list)

    def running_rung(self) -> int:
        return self.home if self.won_s is not None else self.rung


class ThreadGovernor:
    def __init__(
        self,
        threads: int,
        batch_threads: int,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        first_probe_after_s: float = FIRST_PROBE_AFTER_S,
        max_probe_interval_s: float = MAX_PROBE_INTERVAL_S,
    ) -> None:
        rungs = [threads]
        while rungs[-1] > 1:
            rungs.append(rungs[-1] // 2)
        self._rungs = rungs
        self._batch_threads = batch_threads
        self._enabled = enabled and len(rungs) > 1
        self._clock = clock
        self._first_interval = first_probe_after_s
        self._max_interval = max_probe_interval_s
        self._rung = 0
        self._probe: _Probe | None = None
        self._history: dict[tuple[int, int], deque[float]] = {}
        now = clock()
        #: For each direction (+1 = fewer threads, -1 = more): when it may be probed next, and the interval after.
        self._next_probe = {+1: now + first_probe_after_s, -1: now + first_probe_after_s}
        self._interval = {+1: first_probe_after_s, -1: first_probe_after_s}
        self._lock = threading.Lock()  # the engine thread writes, /info and /metrics read
        self._moves = {"fewer": 0, "more": 0}
        #: (batch shape, step seconds) measured on the current rung when the governor moved to it.
        self._arrival: tuple[int, float] | None = None

    @property
    def enabled(self) -> bool:
        return self._enabled

    def current(self) -> ThreadCounts:
        """What the engine should be decoding with now (the probed rung while a probe measures it)."""
        with self._lock:
            return self._counts(self._running_rung())

    def settled(self) -> int:
        """Decode threads of the rung the governor has chosen (not a probe in progress)."""
        with self._lock:
            return self._rungs[self._rung]

    def moves(self) -> dict[str, int]:
        """How many times the governor moved to fewer and to more threads."""
        with self._lock:
            return dict(self._moves)

    def step_done(self, shape: int, seconds: float) -> ThreadCounts | None:
        """Record one pure decode step of ``shape`` tokens that took ``seconds``.

        Returns the thread counts to apply before the next step when they change, else None.
        """
        if not self._enabled:
            return None
        quiet = self._rung == 0 and self._probe is None and seconds < SLOW_STEP_MIN_S
        if quiet and self._clock() < self._next_probe[+1]:
            # Nothing can start a probe: on the top rung, too fast to be a collapse, not yet time to try fewer threads.
            # This runs between two decodes on every step, when the decode has just evicted the interpreter's data
            # from the CPU caches, so the common case takes this short path. No lock, as only the engine thread
            # writes (readers never look at the history).
            self._steps(0, shape).append(seconds)
            return None
        with self._lock:
            before = self._running_rung()
            if self._probe is not None:
                move = self._continue_probe(shape, seconds)
            else:
                move = None
                self._maybe_start_probe(shape, seconds)
            after = self._running_rung()
            change = self._counts(after) if after != before else None
        if move is not None:
            # Outside the lock: a slow log sink must never hold up /info or /metrics.
            _log_move(move)
        return change

    # --- inside the lock -----------------------------------------------------------------------------------

    def _running_rung(self) -> int:
        return self._probe.running_rung() if self._probe else self._rung

    def _counts(self, rung: int) -> ThreadCounts:
        threads = self._rungs[rung]
        # The configured batch threads (prefill may use more cores than decode) hold only on the top rung.
        return ThreadCounts(threads, self._batch_threads if rung == 0 else threads)

    def _steps(self, rung: int, shape: int) -> deque[float]:
        steps = self._history.get((rung, shape))
        if steps is None:
            steps = self._history[rung, shape] = deque(maxlen=HISTORY)
        return steps

    def _maybe_start_probe(self, shape: int, seconds: float) -> None:
        steps = self._steps(self._rung, shape)
        typical = statistics.median(steps) if len(steps) >= REFERENCE_STEPS else None
        steps.append(seconds)
        if len(steps) < REFERENCE_STEPS:
            return  # no reference for this shape yet
        now = self._clock()
        fewer = self._rung + 1 < len(self._rungs)
        collapsing = typical is not None and seconds >= max(SLOWDOWN_RATIO * typical, SLOW_STEP_MIN_S)
        if fewer and collapsing:
            # Straight to one thread: the rungs between may collapse too, and the up-probes climb back from there.
            self._start_probe(len(self._rungs) - 1, shape)
        elif fewer and now >= self._next_probe[+1]:
            self._start_probe(self._rung + 1, shape)
        elif self._rung > 0 and (now >= self._next_probe[-1] or self._eased(shape)):
            self._start_probe(self._rung - 1, shape)

    def _eased(self, shape: int) -> bool:
        """Whether this rung's recent steps of ``shape`` got clearly faster than on arrival (contention eased)."""
        if self._arrival is None or self._arrival[0] != shape:
            return False
        recent = list(self._steps(self._rung, shape))[-REFERENCE_STEPS:]
        typical = statistics.median(recent)
        if typical >= EASED_RATIO * self._arrival[1]:
            return False
        # One look per clear speed-up: if more threads still lose, only a further speed-up tries again this early.
        self._arrival = (shape, typical)
        return True

    def _start_probe(self, rung: int, shape: int) -> None:
        recent = list(self._steps(self._rung, shape))[-REFERENCE_STEPS:]
        self._probe = _Probe(rung, self._rung, shape, statistics.median(recent))

    def _continue_probe(self, shape: int, seconds: float) -> _Move | None:
        probe = self._probe
        assert probe is not None
        if shape != probe.shape:
            # Another batch shape cannot be compared. The probe waits for its own, but not forever: sequences end
            # and the shape it measured may not come back.
            probe.foreign_steps += 1
            if probe.foreign_steps > 2 * PROBE_STEPS:
                self._probe = None
            return None
        if probe.won_s is not None:
            return self._confirm(probe, seconds)
        probe.steps += 1
        steps = self._steps(probe.rung, shape)
        steps.append(seconds)
        if seconds > LOSS_RATIO * probe.reference_s:
            return self._end_probe(won=False, measured_s=seconds)
        if probe.steps >= PROBE_STEPS:
            measured = statistics.median(list(steps)[-PROBE_STEPS:])
            if measured >= WIN_RATIO * probe.reference_s:
                return self._end_probe(won=False, measured_s=measured)
            probe.won_s = measured  # the next steps run back home
        return None

    def _confirm(self, probe: _Probe, seconds: float) -> _Move | None:
        """One step back home after the probed rung won: the win stands only if home is still clearly slower."""
        assert probe.won_s is not None
        self._steps(probe.home, probe.shape).append(seconds)
        probe.confirming.append(seconds)
        if seconds > LOSS_RATIO * probe.won_s:
            return self._end_probe(won=True, measured_s=probe.won_s)
        if len(probe.confirming) < PROBE_STEPS:
            return None
        home_s = statistics.median(probe.confirming)
        return self._end_probe(won=probe.won_s < WIN_RATIO * home_s, measured_s=probe.won_s)

    def _end_probe(self, *, won: bool, measured_s: float) -> _Move | None:
        probe = self._probe
        assert probe is not None
        self._probe = None
        direction = 1 if probe.rung > probe.home else -1
        now = self._clock()
        if not won:
            self._interval[direction] = min(self._interval[direction] * 2, self._max_interval)
            self._next_probe[direction] = now + self._interval[direction]
            return None
        self._rung = probe.rung
        self._arrival = (probe.shape, measured_s)
        self._moves["fewer" if direction > 0 else "more"] += 1
        # A move means conditions changed: both directions are worth a fresh look soon.
        for each in (+1, -1):
            self._interval[each] = self._first_interval
            self._next_probe[each] = now + self._first_interval
        return _Move(self._rungs[probe.home], self._rungs[probe.rung], measured_s, probe.reference_s)


@dataclass(frozen=True)
class _Move:
    before: int
    after: int
    measured_s: float
    reference_s: float


def _log_move(move: _Move) -> None:
    fewer = move.after < move.before
    log.log(
        logging.WARNING if fewer else logging.INFO,
        "decoding with %d thread(s) instead of %d: a step took %.1f ms against %.1f ms%s",
        move.after,
        move.before,
        move.measured_s * 1000,
        move.reference_s * 1000,
        " (CPU contention: another process is using the cores)" if fewer else "",
        extra={"event": "decode_threads", "threads": move.after, "previous_threads": move.before},
    )


def batch_threads(settings: Settings) -> int:
    """Threads for prompt batches: prefill is compute-bound and gains from every usable CPU."""
    return max(settings.n_threads, len(os.sched_getaffinity(0)))


def new_thread_governor(settings: Settings) -> ThreadGovernor:
    return ThreadGovernor(settings.n_threads, batch_threads(settings), enabled=settings.adaptive_threads)
