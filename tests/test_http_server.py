"""The HTTP layer (``http_server.py``): requests httptools cannot parse, oversized heads, keep-alive, through real
uvicorn with the real engine."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

import pytest

from innova_smollm.http_server import MAX_HEAD_BYTES, UNPARSEABLE_REQUEST, ServiceHttpProtocol, uvicorn_config
from tests.conftest import LiveServer

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


def assert_json_400(status: int, headers: dict[str, str], body: bytes, message_part: str) -> None:
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request"
    assert message_part in error["message"]


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
def test_an_unparseable_request_gets_the_json_error_body(live: LiveServer, request_bytes: bytes) -> None:
    with live.connect() as sock:
        sock.sendall(request_bytes)
        assert_json_400(*read_reply(sock), UNPARSEABLE_REQUEST)
    assert live.get(HEALTH).status_code == 200


def send_head_in_pieces(sock: socket.socket, header_count: int) -> bytes | None:
    """Send a request head one 1 KiB header at a time (so the server reads it in many chunks), then end it.

    Returns what the server answered before the head was complete, or None if it waited for the whole head. The
    sending stops as soon as an answer is readable: bytes sent to a closed socket would make the kernel reset the
    connection and drop the answer.
    """
    sock.sendall(b"GET " + HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
    for index in range(header_count):
        time.sleep(0.01)
        if select.select([sock], [], [], 0)[0]:
            return b"answered early"
        sock.sendall(f"X-Pad-{index}: ".encode() + b"a" * 1000 + b"\r\n")
    time.sleep(0.05)
    if select.select([sock], [], [], 0)[0]:
        return b"answered early"
    sock.sendall(b"Connection: close\r\n\r\n")
    return None


def test_a_request_head_that_never_ends_is_refused_after_the_cap(live: LiveServer) -> None:
    with live.connect() as sock:
        early = send_head_in_pieces(sock, header_count=4 * MAX_HEAD_BYTES // 1000)
        assert early is not None, "the server read a 64 KiB head without answering"
        assert_json_400(*read_reply(sock), f"longer than {MAX_HEAD_BYTES // 1024} KiB")


def test_a_head_under_the_cap_in_many_pieces_is_served(live: LiveServer) -> None:
    with live.connect() as sock:
        assert send_head_in_pieces(sock, header_count=(MAX_HEAD_BYTES - 2048) // 1000) is None
        status, _, body = read_reply(sock)
    assert status == 200, body


def test_keep_alive_after_a_large_body_serves_the_next_request(live: LiveServer) -> None:
    # The head cap counts only bytes read while a head is incomplete: a body read on the same connection must
    # never count against the next request's head.
    connection = http.client.HTTPConnection(*live.address, timeout=60)
    try:
        large = json.dumps({"messages": "x" * (4 * MAX_HEAD_BYTES * 4)})
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


def test_every_server_of_the_app_uses_uvloop_and_this_protocol() -> None:
    config = uvicorn_config(object(), host="127.0.0.1", port=0, lifespan="off")
    config.load()
    assert config.http_protocol_class is ServiceHttpProtocol
    assert config.loop == "uvloop"
    assert config.get_loop_factory() is not None
