"""Hostile and careless clients against ``innova-smollm serve`` (issue 22), loopback only, bounded in count and time.

Each test runs the real service as its own process (tests/servers.py ``run_service``) with small bounds, so that
what it waits for happens in seconds: held connections closed at the head timeout, descriptors after a flood, the
request limit, and a streaming client that never reads.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.servers import API, EMBEDDED_MODEL, LONG_PROMPT, NEVER_ENDS, ServiceProcess, run_service, wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

HEALTH = f"{API}/health"


def fds_of(service: ServiceProcess) -> int:
    return sum(1 for _ in Path(f"/proc/{service.process.pid}/fd").iterdir())


def rss_mb(service: ServiceProcess) -> float:
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def ready_service(nofile: int | None = None, **env: str) -> Iterator[ServiceProcess]:
    full = {"SMOLLM_MODEL_PATH": str(EMBEDDED_MODEL), "SMOLLM_N_THREADS": "2", **env}
    with run_service(full, nofile=nofile) as service:
        assert wait_until(lambda: _health(service) == 200, timeout=60), service.output()[-3000:]
        yield service


def _health(service: ServiceProcess, timeout: float = 5) -> int:
    try:
        return requests.get(service.url + HEALTH, timeout=timeout).status_code
    except requests.RequestException:
        return 0


def address(service: ServiceProcess) -> tuple[str, int]:
    return "127.0.0.1", int(service.url.rsplit(":", 1)[1])


def hold(service: ServiceProcess, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(address(service), timeout=10)
        if first_bytes:
            sock.sendall(first_bytes)
        held.append(sock)
    return held


def wait_closed_by_server(socks: list[socket.socket], timeout: float) -> tuple[int, list[bytes]]:
    """How many of ``socks`` the server closed within ``timeout`` (EOF or reset), and what it sent them."""
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = b""
    closed = 0
    deadline = time.monotonic() + timeout
    while closed < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received[sock] += chunk
                continue
            selector.unregister(sock)
            closed += 1
    selector.close()
    return closed, [data for data in received.values() if data]


def test_held_connections_leave_health_and_chat_answering_and_are_closed_at_the_head_timeout() -> None:
    head_timeout = 8
    chat_body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    with ready_service(SMOLLM_HEAD_TIMEOUT_S=str(head_timeout)) as service:
        # A first decode after loading is slow on a busy host; keep it out of the window the connections are held.
        requests.post(service.url + f"{API}/chat", json=chat_body, timeout=60)
        opened = time.monotonic()
        idle = hold(service, 500)
        half = hold(service, 500, b"POST " + API.encode() + b"/chat HTTP/1.1\r\nHost: x\r\nContent-Le")
        try:
            started = time.monotonic()
            health = requests.get(service.url + HEALTH, timeout=5)
            health_s = time.monotonic() - started
            assert health.status_code == 200, health.text
            assert health_s < 1.0
            chat = requests.post(service.url + f"{API}/chat", json=chat_body, timeout=30)
            assert chat.status_code == 200, chat.text
            print(f"health with 1,000 held connections: {health_s * 1000:.1f} ms")

            bound = opened + head_timeout + 5  # the head timeout, and the time it took to open them all
            closed, answers = wait_closed_by_server(idle + half, timeout=max(1.0, bound - time.monotonic()))
            assert closed == 1000, f"only {closed} of the 1,000 held connections were closed by the service"
            # Those that sent half a head got the JSON 408; those that sent nothing, nothing.
            assert len(answers) == 500
            assert all(b" 408 " in data.split(b"\r\n", 1)[0] for data in answers)
            assert all(
                json.loads(data.partition(b"\r\n\r\n")[2])["error"]["type"] == "request_timeout" for data in answers
            )
        finally:
            for sock in idle + half:
                sock.close()
        assert _health(service) == 200
    assert '"level": "error"' not in service.output()


def _flood(service: ServiceProcess, count: int, threads: int = 8) -> None:
    kinds = [
        b"",  # connect and go
        b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\n",  # half a head, then go
        b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a whole request, answer unread
    ]

    def run(offset: int) -> None:
        for n in range(offset, count, threads):
            with contextlib.suppress(OSError):
                sock = socket.create_connection(address(service), timeout=10)
                data = kinds[n % len(kinds)]
                if data:
                    sock.sendall(data)
                sock.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_a_flood_and_connections_held_to_the_descriptor_limit_leave_no_descriptors_and_health_answering() -> None:
    # An open-file limit of 512, as LimitNOFILE would set it: the service holds at most 448 connections.
    with ready_service(nofile=512, SMOLLM_HEAD_TIMEOUT_S="30") as service:
        time.sleep(0.5)
        before = fds_of(service)
        _flood(service, 5000)
        assert wait_until(lambda: fds_of(service) <= before, timeout=10), (before, fds_of(service))
        after_flood = fds_of(service)

        held = hold(service, 600)  # more than the process can hold
        try:
            # Health still answers: the oldest idle connections give way to the new ones.
            statuses = [_health(service) for _ in range(5)]
            assert statuses == [200] * 5, statuses
            at_limit = fds_of(service)
            assert at_limit <= 512
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: fds_of(service) <= before, timeout=10), (before, fds_of(service))
        assert _health(service) == 200
        print(f"descriptors: {before} before, {after_flood} after 5,000 connections, {at_limit} at the limit")
    output = service.output()
    assert '"level": "error"' not in output
    assert output.count("connections_closed") <= 3  # one summary line a minute, never a line per connection


def test_past_the_request_limit_the_answer_is_a_json_503_and_health_still_answers() -> None:
    with ready_service(SMOLLM_MAX_REQUESTS="2", SMOLLM_PARALLEL="1", SMOLLM_MAX_QUEUE="4") as service:
        body = {"prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
        streams = [requests.post(service.url + f"{API}/generate", json=body, stream=True, timeout=60) for _ in range(2)]
        try:
            assert [s.status_code for s in streams] == [200, 200]
            refused = requests.post(
                service.url + f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.headers["Content-Type"].startswith("application/json")
            assert refused.json()["error"]["type"] == "overloaded"
            assert requests.get(service.url + HEALTH, timeout=5).status_code == 200
            assert requests.get(service.url + "/metrics", timeout=5).status_code == 200
        finally:
            for stream in streams:
                stream.close()
        # The limit counts requests: once the streams are gone, requests are answered again.
        assert wait_until(lambda: requests.get(service.url + f"{API}/info", timeout=5).status_code == 200, timeout=10)


def never_reading_stream(service: ServiceProcess, content: str) -> socket.socket:
    """An OpenAI streaming request from a client that never reads a byte of the answer, with a small window."""
    # It must still be answering at the deadline, however fast the host decodes: no end token, no early stop.
    messages = [{"role": "user", "content": content}]
    body = json.dumps(
        {"model": "smollm", "messages": messages, "stream": True, "max_tokens": 3000, "logit_bias": NEVER_ENDS}
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, as a slow path has
    sock.connect(address(service))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
    )
    return sock


def in_flight(service: ServiceProcess) -> float:
    for line in requests.get(service.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("smollm_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no smollm_requests_in_flight")


BOUNDS = {"SMOLLM_IO_TIMEOUT_S": "2", "SMOLLM_HEAD_TIMEOUT_S": "2", "SMOLLM_KEEP_ALIVE_S": "1"}


def test_a_streaming_client_that_never_reads_is_released_at_the_deadline_with_bounded_memory() -> None:
    # The model: the request's sequence and place in line are given back at the deadline (4 s here), though the
    # client reads nothing.
    with ready_service(
        SMOLLM_REQUEST_TIMEOUT_S="4", SMOLLM_PARALLEL="1", SMOLLM_N_CTX="4096", SMOLLM_MAX_TOKENS="3000", **BOUNDS
    ) as service:
        requests.post(service.url + f"{API}/generate", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
        time.sleep(0.5)
        fds_before = fds_of(service)
        sock = never_reading_stream(service, LONG_PROMPT)
        sent_at = time.monotonic()
        try:
            assert wait_until(lambda: in_flight(service) == 1, timeout=5), service.output()[-3000:]
            assert wait_until(lambda: in_flight(service) == 0, timeout=4 + 2 + 3)
            freed_s = time.monotonic() - sent_at
            assert wait_until(lambda: fds_of(service) <= fds_before, timeout=1 + 2 + 2 + 3)
            closed_s = time.monotonic() - sent_at
        finally:
            sock.close()
    logged = [json.loads(line) for line in service.output().splitlines() if '"/v1/chat/completions"' in line]
    assert [line["finish_reason"] for line in logged] == ["timeout"]
    print(f"never-reading client, model: sequence freed after {freed_s:.1f} s, connection after {closed_s:.1f} s")

    # Answers far larger than what the kernel buffers on loopback (the echo provider answers a 6 MB message with
    # itself): the clients take nothing, so the service drops them after SMOLLM_IO_TIMEOUT_S without progress.
    with ready_service(PROVIDER="echo", SMOLLM_MAX_BODY_BYTES=str(8 * 1024 * 1024), **BOUNDS) as service:
        time.sleep(0.5)
        fds_before, rss_before = fds_of(service), rss_mb(service)
        socks = [never_reading_stream(service, "x" * 6_000_000) for _ in range(2)]
        sent_at = time.monotonic()
        try:
            assert wait_until(lambda: fds_of(service) > fds_before, timeout=5)
            peak = rss_mb(service)
            released = wait_until(lambda: fds_of(service) <= fds_before, timeout=2 + 2 + 5)
            released_s = time.monotonic() - sent_at
            rss_after = rss_mb(service)
            assert released, f"the never-reading clients' connections are still open after {released_s:.1f} s"
            assert rss_after - rss_before < 50, (rss_before, peak, rss_after)
            assert _health(service) == 200
        finally:
            for sock in socks:
                sock.close()
    print(
        f"never-reading clients, 2 x 6 MB answers: released after {released_s:.1f} s, "
        f"RSS {rss_before:.0f} -> {peak:.0f} (held) -> {rss_after:.0f} MB"
    )
