"""The connection guard's logic (http/connections.py) and the request limit (http/request_limit.py), with a fake
transport and a fake inner protocol: pure logic on a real asyncio loop, short timeouts, no sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from innova_smollm.http.connections import (
    MAX_HEAD_BYTES,
    BodyStalledError,
    ConnectionHooks,
    ConnectionPolicy,
    GuardedConnection,
    HeadScanner,
    HeadTooLargeError,
    Phase,
    guarded_protocol,
    max_connections_for,
)
from innova_smollm.http.request_limit import RequestLimit

HEAD = b"GET /innova/api/smollm/health HTTP/1.1\r\nHost: x\r\n\r\n"


# --- the head scanner ----------------------------------------------------------------------------------------


def test_a_head_ends_at_its_blank_line_wherever_the_reads_split_it() -> None:
    for cut in range(1, len(HEAD)):
        scanner = HeadScanner(MAX_HEAD_BYTES)
        assert scanner.feed(HEAD[:cut]) is None or cut == len(HEAD)
        assert scanner.feed(HEAD[cut:] + b"body") == len(HEAD) - cut
        assert scanner.size == len(HEAD)


def test_blank_lines_before_a_request_line_count_but_do_not_end_it() -> None:
    scanner = HeadScanner(MAX_HEAD_BYTES)
    assert scanner.feed(b"\r\n\r\n\r\n") is None
    assert scanner.feed(HEAD) == len(HEAD)
    assert scanner.size == len(HEAD) + 6


def test_a_head_over_the_cap_is_refused_whether_in_pieces_or_whole() -> None:
    scanner = HeadScanner(1024)
    with pytest.raises(HeadTooLargeError):
        for _ in range(100):
            scanner.feed(b"X-Pad: " + b"a" * 50 + b"\r\n")
    whole = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    with pytest.raises(HeadTooLargeError):
        HeadScanner(1024).feed(whole)
    with pytest.raises(HeadTooLargeError):
        HeadScanner(1024).feed(b"\r\n" * 600)
    assert HeadScanner(len(HEAD)).feed(HEAD) == len(HEAD)  # exactly the cap is allowed


def test_max_connections_leave_a_reserve_of_descriptors() -> None:
    assert max_connections_for(65536) == 65536 - 1024
    assert max_connections_for(20000) == 20000 - 1024
    assert max_connections_for(1024) == 1024 - 102
    assert max_connections_for(256) == 256 - 64
    assert max_connections_for(10) == 16


# --- the guard, with a fake transport ------------------------------------------------------------------------


class FakeTransport:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.written = b""
        self.closing = False
        self.aborted = False
        self.buffered = 0
        self.protocol: asyncio.Protocol | None = None
        self.lost = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.eof
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if not self.buffered:
                self._lose()

    def abort(self) -> None:
        self.aborted = True
        self.closing = True
        self._lose()

    def _lose(self) -> None:
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeInner(asyncio.Protocol):
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.events: list[tuple[str, Any]] = []

    def connection_made(self, transport: Any) -> None:
        self.events.append(("made", transport))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))

    def pause_writing(self) -> None:
        self.events.append(("pause", None))

    def resume_writing(self) -> None:
        self.events.append(("resume", None))


POLICY = ConnectionPolicy(
    head_timeout_s=0.2, io_timeout_s=0.2, keep_alive_s=0.1, max_connections=3, max_request_bytes=10_000
)


def connect(cls: type[GuardedConnection], loop: asyncio.AbstractEventLoop) -> tuple[GuardedConnection, FakeTransport]:
    protocol = cls(config="config", server_state="state", app_state={}, _loop=loop)
    transport = FakeTransport(loop)
    transport.protocol = protocol
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def run(test: Callable[[asyncio.AbstractEventLoop], Any]) -> Any:
    async def main() -> Any:
        return await test(asyncio.get_running_loop())

    return asyncio.run(main())


def status_of(written: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = written.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_inner_protocol_gets_uvicorns_arguments_and_every_callback() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        inner = protocol.inner
        assert isinstance(inner, FakeInner)
        assert inner.kwargs == {"config": "config", "server_state": "state", "app_state": {}, "_loop": loop}
        protocol.data_received(HEAD)
        protocol.pause_writing()
        protocol.resume_writing()
        transport.close()
        await asyncio.sleep(0)
        assert [name for name, _ in inner.events] == ["made", "data", "pause", "resume", "lost"]
        assert cls.table.open == 0

    run(test)


def test_a_connection_that_sends_nothing_is_closed_silently_at_the_head_timeout() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        _protocol, transport = connect(cls, loop)
        await asyncio.sleep(0.1)
        assert not transport.closing
        await asyncio.sleep(0.2)
        assert transport.closing and transport.written == b""
        assert cls.table.closed == {"idle": 1}

    run(test)


def test_half_a_head_gets_a_json_408_at_the_head_timeout() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(HEAD[:20])
        await asyncio.sleep(0.3)
        status, body = status_of(transport.written)
        assert (status, body["error"]["type"]) == (408, "request_timeout")
        assert b"connection: close" in transport.written and transport.eof
        # A lingering close: what the client still sends is read and dropped, then the connection closes.
        protocol.data_received(b"more")
        assert not transport.closing
        await asyncio.sleep(0.25)
        assert transport.closing

    run(test)


def test_an_oversized_head_in_pieces_gets_a_json_400_and_is_not_passed_on() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(b"GET / HTTP/1.1\r\n")
        while not transport.eof:
            protocol.data_received(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        status, body = status_of(transport.written)
        assert (status, body["error"]["type"]) == (400, "request_too_large")
        inner = protocol.inner
        assert isinstance(inner, FakeInner)
        passed = sum(len(data) for name, data in inner.events if name == "data")
        assert passed <= MAX_HEAD_BYTES

    run(test)


def test_a_complete_head_stops_the_timer_and_the_answer_rearms_it_for_keep_alive() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(HEAD)
        request = protocol.request_started(has_body=False)
        await asyncio.sleep(0.4)  # a request may run longer than the head timeout
        assert not transport.closing and protocol.phase is Phase.REQUEST
        protocol.request_finished(request)
        assert protocol.phase is Phase.HEAD
        protocol.data_received(HEAD[:10])  # the next head's first bytes: head timeout from now
        await asyncio.sleep(0.3)
        assert status_of(transport.written)[0] == 408

    run(test)


def test_a_late_report_of_an_earlier_request_cannot_end_a_later_one() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, _ = connect(cls, loop)
        first = protocol.request_started(has_body=False)
        protocol.request_finished(first)
        second = protocol.request_started(has_body=False)
        protocol.request_finished(first)
        assert protocol.phase is Phase.REQUEST
        protocol.request_finished(second)
        assert protocol.phase is Phase.HEAD

    run(test)


def test_bytes_after_an_unread_body_are_not_counted_as_a_head() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(b"POST / HTTP/1.1\r\nContent-Length: 9000\r\n\r\n")
        request = protocol.request_started(has_body=True)
        protocol.request_finished(request)  # answered (a 401, say) without reading the body
        assert protocol.phase is Phase.UNSURE
        protocol.data_received(b"x" * 9000)  # the rest of the body: no 400 for a "head" over 16 KiB... or 9000 bytes
        assert not transport.closing
        protocol.data_received(b"x" * 2000)  # but past max_request_bytes in all
        assert transport.aborted

    run(test)


def test_past_the_connection_cap_the_oldest_waiting_connection_gives_way() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        held = [connect(cls, loop) for _ in range(3)]
        busy = held[1][0]
        busy.data_received(HEAD)
        busy.request_started(has_body=False)
        fourth, _ = connect(cls, loop)
        assert held[0][1].aborted and not held[1][1].closing and not held[2][1].closing
        await asyncio.sleep(0)
        assert cls.table.open == 3
        # When every connection is inside a request, the newcomer is refused with a JSON 503.
        for protocol in (held[2][0], fourth):
            protocol.data_received(HEAD)
            protocol.request_started(has_body=False)
        newcomer, transport = connect(cls, loop)
        status, body = status_of(transport.written)
        assert (status, body["error"]["type"]) == (503, "overloaded")
        assert b"retry-after: 1" in transport.written
        assert isinstance(newcomer.inner, FakeInner) and newcomer.inner.events == []

    run(test)


def test_an_answer_its_client_never_takes_is_aborted_after_the_io_timeout() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(HEAD)
        protocol.request_started(has_body=False)
        transport.buffered = 70_000
        protocol.pause_writing()
        assert await protocol.wait_writable() is False
        assert transport.aborted
        assert cls.table.closed == {"send_stalled": 1}

    run(test)


def test_a_slow_reader_that_takes_bytes_is_not_cut() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(HEAD)
        protocol.request_started(has_body=False)
        transport.buffered = 70_000
        protocol.pause_writing()

        async def reader() -> None:
            for _ in range(4):
                await asyncio.sleep(0.15)
                transport.buffered -= 10_000
            protocol.resume_writing()

        task = asyncio.ensure_future(reader())
        assert await protocol.wait_writable() is True
        await task
        assert not transport.closing

    run(test)


def test_a_close_that_cannot_flush_is_aborted() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        protocol.data_received(HEAD)
        request = protocol.request_started(has_body=False)
        transport.buffered = 100_000
        transport.close()  # as uvicorn does after a "connection: close" answer
        protocol.request_finished(request)
        await asyncio.sleep(0.4)
        assert transport.aborted
        assert cls.table.closed == {"close_stalled": 1}

    run(test)


# --- the middleware ------------------------------------------------------------------------------------------


def _scope(path: str = "/innova/api/smollm/chat", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "path": path, "method": "POST", "headers": headers or [], "state": {}}


def test_the_hooks_report_a_request_to_its_connection_and_bound_a_stalled_body() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        cls = guarded_protocol(FakeInner, POLICY)
        protocol, transport = connect(cls, loop)
        seen: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(protocol.phase.value)
            with pytest.raises(BodyStalledError) as stalled:
                await receive()
            assert stalled.value.status_code == 408
            await send({"type": "http.response.start", "status": 408, "headers": []})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            seen.append(protocol.phase.value)

        async def never() -> Any:
            await asyncio.sleep(10)

        async def send(message: Any) -> None:
            pass

        from innova_smollm.http import connections

        token = connections._current.set(protocol)
        try:
            hooks = ConnectionHooks(app)  # type: ignore[arg-type]
            await hooks(_scope(headers=[(b"content-length", b"10")]), never, send)  # type: ignore[arg-type]
        finally:
            connections._current.reset(token)
        assert seen == ["request", "unsure"]  # the body was never complete: the next bytes may be the rest of it
        assert cls.table.closed == {"body_stalled": 1}
        assert not transport.closing

    run(test)


def test_without_a_guard_the_hooks_pass_everything_through() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        calls = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            calls.append((receive, send))

        async def receive() -> Any:
            return {}

        async def send(message: Any) -> None:
            pass

        await ConnectionHooks(app)(_scope(), receive, send)  # type: ignore[arg-type]
        assert calls == [(receive, send)]

    run(test)


def test_the_request_limit_counts_requests_and_lets_health_and_metrics_through() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        release = asyncio.Event()
        answered: list[tuple[str, int, dict[bytes, bytes], bytes]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["path"] == "/slow":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        limit = RequestLimit(app, limit=2)  # type: ignore[arg-type]

        async def call(path: str) -> None:
            start: dict[str, Any] = {}

            async def send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    start.update(message)
                elif not message.get("more_body"):
                    answered.append((path, start["status"], dict(start["headers"]), message["body"]))

            async def receive() -> Any:
                return {"type": "http.request", "body": b"", "more_body": False}

            await limit(_scope(path), receive, send)  # type: ignore[arg-type]

        slow = [asyncio.ensure_future(call("/slow")) for _ in range(2)]
        await asyncio.sleep(0)
        assert limit.in_flight == 2
        for path in ("/innova/api/smollm/chat", "/v1/chat/completions", "/innova/api/smollm/health", "/metrics"):
            await call(path)
        release.set()
        await asyncio.gather(*slow)
        assert limit.in_flight == 0
        by_path = {path: (status, headers, body) for path, status, headers, body in answered}
        status, headers, body = by_path["/innova/api/smollm/chat"]
        assert (status, headers[b"retry-after"], headers[b"content-type"]) == (503, b"1", b"application/json")
        assert json.loads(body)["error"]["type"] == "overloaded"
        status, _, body = by_path["/v1/chat/completions"]
        assert status == 503 and json.loads(body)["error"]["type"] == "server_error"  # OpenAI's shape
        assert by_path["/innova/api/smollm/health"][0] == 200
        assert by_path["/metrics"][0] == 200
        assert limit.refused == 2
        await call("/innova/api/smollm/chat")
        assert answered[-1][1] == 200

    run(test)
