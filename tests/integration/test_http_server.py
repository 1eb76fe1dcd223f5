"""The HTTP layer (``http/server.py``, ``http/connections.py``): requests httptools cannot parse, request heads over
the cap or sent slowly, keep-alive, through real uvicorn with the real engine."""

from __future__ import annotations

import dataclasses
import http.client
import json
import select
import socket
import time

import pytest

from innova_smollm.http.connections import MAX_HEAD_BYTES, GuardedConnection
from innova_smollm.http.server import uvicorn_config
from tests.servers import API, LiveServer, serve_in_thread

HEALTH = "/innova/api/smollm/health"


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole answer from a connection the server closes after it (every 400 here says ``connection: close``)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Odd: a\x7fb\r\n\r\n",  # DEL in a header value
        b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",  # a space in a header name
        b"NOT A REQUEST LINE\r\n\r\n",
        b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    ],
    ids=["del-in-header", "space-in-name", "request-line", "negative-length"],
)
def test_an_unparseable_request_gets_a_400_and_the_connection_closed(live: LiveServer, request_bytes: bytes) -> None:
    # uvicorn answers these itself, before the app sees a request, so the body is its plain text (README says so).
    with live.connect() as sock:
        sock.sendall(request_bytes)
        status, headers, body = read_reply(sock)
    assert status == 400, body
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert live.get(HEALTH).status_code == 200


def test_keep_alive_after_a_large_body_serves_the_next_request(live: LiveServer) -> None:
    connection = http.client.HTTPConnection(*live.address, timeout=60)
    try:
        large = json.dumps({"messages": "x" * 256 * 1024})
        for _ in range(3):
            connection.request("POST", "/innova/api/smollm/chat", large, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            assert reply.status == 400
            assert json.loads(reply.read())["error"]["field"] == "messages"
            connection.request("GET", HEALTH)
            reply = connection.getresponse()
            assert reply.status == 200, reply.read()
            reply.read()
    finally:
        connection.close()


def test_an_oversized_head_sent_in_pieces_gets_a_json_400(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        # Up to 2 MB in 1 KB header lines, stopping once an answer is there: stock httptools held it all, unanswered.
        while sent < 2 * 1024 * 1024 and not select.select([sock], [], [], 0.001)[0]:
            sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            sent += 1009
        status, headers, body = read_reply(sock)
    assert status == 400, body
    assert json.loads(body)["error"]["type"] == "request_too_large"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert sent < 64 * 1024  # refused at the cap, not at the end
    assert live.get(HEALTH).status_code == 200


def test_a_head_under_the_cap_sent_in_many_pieces_is_served(live: LiveServer) -> None:
    head = b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
    head += b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 90) for i in range(100))  # about 10 KB
    head += b"Connection: close\r\n\r\n"
    assert len(head) < MAX_HEAD_BYTES
    with live.connect() as sock:
        for start in range(0, len(head), 37):
            sock.sendall(head[start : start + 37])
            time.sleep(0.001)
        status, _, body = read_reply(sock)
    assert status == 200, body


def test_a_request_that_runs_longer_than_the_head_timeout_is_not_cut(engine: object, model_path: object) -> None:
    from tests.servers import make_settings

    settings = dataclasses.replace(make_settings(model_path), head_timeout_s=0.5)  # type: ignore[arg-type]
    with serve_in_thread(settings, engine=engine) as server:
        connection = http.client.HTTPConnection(*server.address, timeout=60)
        try:
            for _ in range(2):  # and the keep-alive connection then serves the next request
                body = {"prompt": "Count from 1 to 1000: 1, 2, 3,", "max_tokens": 200, "temperature": 0}
                started = time.monotonic()
                # X-Forwarded-For: uvicorn rewrites the scope's client from it, which must not unlink the guard.
                headers = {"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.9"}
                connection.request("POST", f"{API}/generate", json.dumps(body), headers)
                reply = connection.getresponse()
                assert reply.status == 200, reply.read()
                reply.read()
                assert time.monotonic() - started > 0.5
        finally:
            connection.close()


def test_every_server_of_the_app_uses_stock_uvicorn_with_uvloop_and_httptools_behind_the_guard() -> None:
    config = uvicorn_config(object(), host="127.0.0.1", port=0, lifespan="off")
    assert config.loop == "uvloop"
    assert isinstance(config.http, type) and issubclass(config.http, GuardedConnection)
    assert config.http.inner_factory.__module__ == "uvicorn.protocols.http.httptools_impl"
    assert config.limit_concurrency is None  # it counted idle connections as requests (issue 22)
    config.load()
    assert config.get_loop_factory() is not None
