"""The decode-thread governor in the real service under real CPU contention (system tier: minutes, and busy loops
on every core)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.servers import API, ServiceProcess, run_service, wait_until

pytestmark = pytest.mark.system


class BusyLoops:
    """Busy loops, one per usable core, each in a session of its own as another service would be.

    Linux's autogroup scheduler (on here) shares the CPU between sessions first, so the service gets only its share
    whatever its nice value: the situation of innovaplus-backend.service next to a busy neighbour.
    """

    def __init__(self) -> None:
        self._loops = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(len(os.sched_getaffinity(0)))
        ]

    def stop(self) -> None:
        for loop in self._loops:
            if loop.poll() is None:
                os.killpg(loop.pid, signal.SIGKILL)
                loop.wait()


@pytest.fixture
def busy_cores() -> Iterator[Callable[[], BusyLoops]]:
    """Starts the busy loops when called; they are stopped at the end of the test whatever happens."""
    started: list[BusyLoops] = []

    def start() -> BusyLoops:
        started.append(BusyLoops())
        return started[-1]

    try:
        yield start
    finally:
        for loops in started:
            loops.stop()


def _decode_threads(service: ServiceProcess) -> int:
    info = requests.get(f"{service.url}{API}/info", timeout=60).json()
    return int(info["decode_threads"])


def _answer_while(service: ServiceProcess, condition: Callable[[], bool], limit_s: float) -> bool:
    """Keep one client chatting until ``condition`` holds, for at most ``limit_s`` seconds."""
    payload = {"messages": [{"role": "user", "content": "Count from 1 to 100."}], "max_tokens": 24, "temperature": 0}

    def one_answer_then_check() -> bool:
        reply = requests.post(f"{service.url}{API}/chat", json=payload, timeout=120)
        assert reply.status_code == 200, reply.text
        return condition()

    return wait_until(one_answer_then_check, timeout=limit_s, interval=0)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("parallel", ["1", "4"])
def test_the_engine_leaves_a_collapse_under_contention_and_comes_back(
    model_path: object, busy_cores: Callable[[], BusyLoops], parallel: str
) -> None:
    """Against the contention this test adds, not against an idle box: the machine may already be busy (another
    process holding a core), and then the governor is right to decode with one thread before the test starts. So
    the test reads where the governor settles on the machine as it is, adds a busy loop per core, expects one
    thread, removes them, and expects the governor back where it was."""
    env = {"SMOLLM_MODEL_PATH": str(model_path), "SMOLLM_N_THREADS": "2", "SMOLLM_PARALLEL": parallel}
    with run_service(env, new_session=True) as service:
        assert wait_until(lambda: _ready(service), timeout=120)
        before = _settled_threads(service)
        busy = busy_cores()
        assert _answer_while(service, lambda: _decode_threads(service) == 1, limit_s=240), (
            f"{_decode_threads(service)} threads kept decoding under contention"
        )
        metrics = requests.get(f"{service.url}/metrics", timeout=60).text
        assert "smollm_decode_threads 1.0" in metrics
        busy.stop()
        assert _answer_while(service, lambda: _decode_threads(service) == before, limit_s=240), (
            f"the engine stayed on {_decode_threads(service)} threads after the contention ended; it had {before}"
        )
        log = service.output()
    if before == 2:
        assert '"event": "decode_threads", "threads": 1, "previous_threads": 2' in log
        assert '"event": "decode_threads", "threads": 2, "previous_threads": 1' in log


def _settled_threads(service: ServiceProcess) -> int:
    """The thread count the governor keeps on the machine as it is: the same for three answers in a row."""
    seen: list[int] = []

    def steady() -> bool:
        seen.append(_decode_threads(service))
        return len(seen) >= 3 and len(set(seen[-3:])) == 1

    assert _answer_while(service, steady, limit_s=120), f"the decode threads never settled: {seen}"
    return seen[-1]


def _ready(service: ServiceProcess) -> bool:
    try:
        return requests.get(f"{service.url}{API}/health", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False
