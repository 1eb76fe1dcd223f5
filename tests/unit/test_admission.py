"""Bounded admission (pure logic): capacity, release, Retry-After estimates, thread safety."""

from __future__ import annotations

import threading

import pytest

from innova_smollm.core.admission import Admission
from innova_smollm.errors import QueueFullError


def test_admits_parallel_plus_queue_then_refuses_with_retry_after() -> None:
    admission = Admission(parallel=2, max_queue=3, first_guess_s=4.0)
    tickets = [admission.admit() for _ in range(5)]
    assert admission.in_flight == 5
    with pytest.raises(QueueFullError) as refused:
        admission.admit()
    assert refused.value.retry_after_s == 8  # 3 waiting + this one, 2 at a time, 4 s each
    assert "SMOLLM_MAX_QUEUE=3" in refused.value.message
    tickets[0].release()
    tickets[0].release()  # twice is harmless
    assert admission.in_flight == 4
    admission.admit()
    assert admission.in_flight == 5


def test_a_zero_queue_still_runs_one_at_a_time() -> None:
    admission = Admission(parallel=1, max_queue=0)
    ticket = admission.admit()
    with pytest.raises(QueueFullError):
        admission.admit()
    ticket.release()
    admission.admit().release()
    assert admission.in_flight == 0


def test_retry_after_follows_measured_durations_and_stays_bounded() -> None:
    admission = Admission(parallel=1, max_queue=1, first_guess_s=4.0)
    for _ in range(30):
        admission.observe_duration(0.2)
    assert admission.retry_after_s(0) == 1
    for _ in range(30):
        admission.observe_duration(500.0)
    assert admission.retry_after_s(10) == 60


def test_concurrent_admits_never_exceed_capacity() -> None:
    admission = Admission(parallel=2, max_queue=2)
    admitted: list[object] = []
    refused: list[QueueFullError] = []
    lock = threading.Lock()

    def try_admit() -> None:
        try:
            ticket = admission.admit()
        except QueueFullError as exc:
            with lock:
                refused.append(exc)
        else:
            with lock:
                admitted.append(ticket)

    threads = [threading.Thread(target=try_admit) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 4 and len(refused) == 46
    assert admission.in_flight == 4


def test_a_request_with_n_choices_takes_n_places() -> None:
    admission = Admission(parallel=4, max_queue=0)
    single = admission.admit()
    three = admission.admit(3)
    assert admission.in_flight == 4
    with pytest.raises(QueueFullError):
        admission.admit()
    three.release()
    with pytest.raises(QueueFullError):
        admission.admit(4)  # one place is still taken
    two = admission.admit(2)
    single.release()
    two.release()
    assert admission.in_flight == 0
