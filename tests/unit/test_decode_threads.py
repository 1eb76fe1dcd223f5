"""The thread governor: pure logic against a simulated machine (the real engine under real contention is in
tests/system/test_decode_threads_contention.py).

The simulation gives each decode step a duration that depends on the thread count, the way the reference box
behaved: idle, 2 threads decode a token in about 10 ms and 1 thread in about 17 ms; with two busy processes in
other sessions, 2 threads spin at llama.cpp's barrier and a step takes about a second, while 1 thread takes 20 ms.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from innova_smollm.engine.threads import MAX_PROBE_INTERVAL_S, SLOW_STEP_MIN_S, ThreadCounts, ThreadGovernor

IDLE = {2: 0.010, 1: 0.017}
CONTENDED = {2: 1.0, 1: 0.020}


class SimulatedMachine:
    """Runs decode steps through a governor, advancing a fake clock by each step's duration."""

    def __init__(self, threads: int = 2, batch_threads: int = 2) -> None:
        self.now = 0.0
        self.governor = ThreadGovernor(threads, batch_threads, clock=lambda: self.now)
        self.applied: list[ThreadCounts] = []
        self.threads_used: list[int] = []
        #: The rungs the governor settled on, in order (probes are not moves).
        self.settled = [threads]

    def run(self, seconds: float, step_time: Callable[[int], float], shapes: Iterator[int] | None = None) -> None:
        """Decode for ``seconds`` of simulated time; a step of shape 4 takes three times a step of shape 1."""
        shapes = shapes or itertools.repeat(1)
        end = self.now + seconds
        while self.now < end:
            threads = self.governor.current().decode
            shape = next(shapes)
            took = step_time(threads) * (3 if shape == 4 else 1)
            self.threads_used.append(threads)
            self.now += took
            change = self.governor.step_done(shape, took)
            if change is not None:
                self.applied.append(change)
            if self.governor.settled() != self.settled[-1]:
                self.settled.append(self.governor.settled())


def test_an_idle_machine_keeps_every_thread_and_probes_less_and_less() -> None:
    machine = SimulatedMachine()
    machine.run(300, IDLE.__getitem__)
    assert machine.settled == [2]
    assert machine.governor.moves() == {"fewer": 0, "more": 0}
    one_thread_steps = machine.threads_used.count(1)
    # Probes at 2, 4, 8, 16, 32 s, then once a minute: a handful of 3-step probes in 5 minutes.
    assert 3 * 6 <= one_thread_steps <= 3 * 12
    assert one_thread_steps / len(machine.threads_used) < 0.002


def test_a_collapse_moves_to_one_thread_within_a_few_slow_steps() -> None:
    machine = SimulatedMachine(threads=2, batch_threads=4)
    machine.run(10, IDLE.__getitem__)
    steps_before = len(machine.threads_used)
    machine.run(30, CONTENDED.__getitem__)
    assert machine.governor.settled() == 1
    slow_steps = [t for t in machine.threads_used[steps_before:] if t == 2]
    # The first slow step starts a probe; the probe may lose against a reference still made of fast steps, so the
    # second or third slow step settles it, after one confirming step back home (slower than the probe by more than
    # LOSS_RATIO, so the win stands at once). The up-probes that follow are cut after one step each.
    first_move = machine.threads_used.index(1, steps_before)
    assert machine.threads_used[steps_before:first_move].count(2) <= 3
    assert len(slow_steps) <= 3 + 5
    # On the lower rung, prompt batches use the same single thread: two would collapse the same way.
    assert ThreadCounts(decode=1, batch=1) in machine.applied


def test_home_slow_for_a_moment_before_a_probe_does_not_move_the_threads() -> None:
    # Seen in the one-client benchmark on an idle box: the steps before a scheduled probe were slow for a moment
    # (22 ms), one thread then took 15.8 ms, and two threads were soon back at about 10 ms.
    machine = SimulatedMachine()
    machine.run(1.9, IDLE.__getitem__)
    warming_up = {2: 0.022, 1: 0.0158}
    while machine.governor.current().decode == 2:
        machine.run(0.001, warming_up.__getitem__)
    machine.run(2 * 0.0158, warming_up.__getitem__)
    machine.run(10, IDLE.__getitem__)
    assert machine.settled == [2]
    assert machine.governor.moves() == {"fewer": 0, "more": 0}
    # The probe's three one-thread steps, then straight back to two threads for the confirming steps.
    first_probe = machine.threads_used.index(1)
    assert machine.threads_used[first_probe : first_probe + 6] == [1, 1, 1, 2, 2, 2]


def test_the_threads_come_back_when_the_contention_ends() -> None:
    machine = SimulatedMachine(threads=2, batch_threads=4)
    machine.run(5, IDLE.__getitem__)
    machine.run(20, CONTENDED.__getitem__)
    assert machine.governor.settled() == 1
    machine.run(60, IDLE.__getitem__)
    assert machine.settled == [2, 1, 2]
    assert machine.governor.moves() == {"fewer": 1, "more": 1}
    assert machine.applied[-1] == ThreadCounts(decode=2, batch=4)


def test_the_threads_come_back_at_once_when_one_thread_speeds_up_after_the_contention() -> None:
    # Two busy processes leave one decode thread about two thirds of a core: its steps speed up when they stop.
    sharing_one_core = {2: 1.0, 1: 0.030}
    machine = SimulatedMachine()
    machine.run(5, IDLE.__getitem__)
    machine.run(30, sharing_one_core.__getitem__)
    assert machine.governor.settled() == 1
    machine.run(0.5, IDLE.__getitem__)
    # Without this, the next up-probe would wait out the interval doubled by the probes lost under contention.
    assert machine.settled == [2, 1, 2]


def test_under_lasting_contention_each_probe_of_more_threads_costs_one_step_and_they_thin_out() -> None:
    machine = SimulatedMachine()
    machine.run(5, IDLE.__getitem__)
    contention_starts = len(machine.threads_used)
    machine.run(600, CONTENDED.__getitem__)
    slow_steps = machine.threads_used[contention_starts:].count(2)
    # Up to 3 slow steps before the move, then up-probes at 2, 4, ... s and every MAX_PROBE_INTERVAL_S after that:
    # about 15 in 10 minutes, each cut after its first slow step.
    assert slow_steps <= 3 + 600 / MAX_PROBE_INTERVAL_S + 6
    assert machine.governor.settled() == 1


def test_probes_compare_only_steps_of_the_same_shape() -> None:
    machine = SimulatedMachine()
    # Batches of four tokens alternate with single tokens: a four-token step after one-token steps is slower for
    # its own reasons and must not look like a collapse, nor win or lose a probe of the other shape.
    machine.run(300, IDLE.__getitem__, shapes=itertools.cycle([1, 4]))
    assert machine.governor.settled() == 2
    assert machine.governor.moves() == {"fewer": 0, "more": 0}


def test_a_probe_whose_batch_shape_does_not_come_back_ends_without_a_verdict() -> None:
    machine = SimulatedMachine()
    # Two sequences decode until the first probe starts, then one of them ends: only one-token steps follow.
    machine.run(2.1, IDLE.__getitem__, shapes=itertools.repeat(4))
    assert machine.governor.current().decode == 1, "the scheduled probe of one thread should have started"
    machine.run(0.5, IDLE.__getitem__, shapes=itertools.repeat(1))
    assert machine.governor.current().decode == 2
    assert machine.settled == [2]


def test_eight_threads_drop_to_one_then_climb_to_the_best_rung() -> None:
    def two_cores_free(threads: int) -> float:
        # Only two cores are really free: more threads than that collapse, fewer leave one idle.
        return {1: 0.04, 2: 0.02}.get(threads, 1.0)

    machine = SimulatedMachine(threads=8, batch_threads=8)
    machine.run(5, lambda threads: 0.08 / threads)
    machine.run(120, two_cores_free)
    assert machine.governor.settled() == 2
    assert machine.settled == [8, 1, 2]
    assert machine.governor.moves() == {"fewer": 1, "more": 1}


def test_a_model_slower_than_the_quick_path_is_governed_the_same() -> None:
    # The production model (Llama-3.2-3B) takes about 120 ms a token on the reference box: every step is slower than
    # SLOW_STEP_MIN_S, so none takes step_done's quick path, and the full path alone must collapse and recover.
    idle = {2: 0.12, 1: 0.20}
    contended = {2: 10.0, 1: 0.25}
    assert min(idle.values()) > SLOW_STEP_MIN_S
    machine = SimulatedMachine()
    machine.run(10, idle.__getitem__)
    assert machine.settled == [2]
    machine.run(120, contended.__getitem__)
    assert machine.governor.settled() == 1
    machine.run(120, idle.__getitem__)
    assert machine.settled == [2, 1, 2]


@pytest.mark.parametrize(("threads", "enabled"), [(1, True), (2, False)])
def test_nothing_moves_when_disabled_or_with_one_thread(threads: int, enabled: bool) -> None:
    governor = ThreadGovernor(threads, threads, enabled=enabled, clock=lambda: 1000.0)
    assert not governor.enabled
    assert all(governor.step_done(1, 5.0) is None for _ in range(50))
    assert governor.settled() == threads
