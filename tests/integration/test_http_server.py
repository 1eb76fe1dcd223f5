"""The HTTP layer (``http/server.py``): requests httptools cannot parse and keep-alive, through real uvicorn with
the real engine."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

from innova_smollm.http.server import uvicorn_config
from tests.servers import LiveServer

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


def test_every_server_of_the_app_uses_stock_uvicorn_with_uvloop_and_httptools() -> None:
    config = uvicorn_config(object(), host="127.0.0.1", port=0, lifespan="off")
    assert (config.loop, config.http) == ("uvloop", "httptools")
    config.load()
    assert config.get_loop_factory() is not None
