"""How uvicorn serves the app: uvloop, httptools, and this service's rules for requests that are not valid HTTP.

Why uvloop and httptools rather than asyncio and h11: every streamed token costs the event loop a wake-up, an SSE
frame and a socket write, and on a 2-core box that CPU is taken from llama.cpp's two decode threads. Measured with
one streaming client (SmolLM2, 128 tokens x 12 requests, 3 alternating runs): the loop's thread used 0.35 ms of CPU
per token with asyncio + h11 and 0.25 ms with uvloop + httptools (README, Performance).

:class:`ServiceHttpProtocol` also offers each request the ASGI scope extension ``innova.socket_writer``
(:mod:`innova_smollm.socket_writer`): in the middle of a chunked HTTP/1.1 body, the engine thread may write a streamed
answer's chunks to the socket itself, without waking the event loop per token.

httptools leaves two gaps that h11 did not, closed here:
- uvicorn answers a request it cannot parse (a DEL byte in a header value, a broken request line) with a plain-text
  400. This service answers every error with its JSON error body, so :class:`ServiceHttpProtocol` does here too.
- h11 stops reading a request head at 16 KiB; httptools buffers a head of any size. Without a bound a client could
  make the service hold headers without end, so a head still incomplete after :data:`MAX_HEAD_BYTES` is refused
  (a whole head that arrives in one read is parsed as it is: what is held stays within the cap plus one read).
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from innova_smollm.http_errors import error_body
from innova_smollm.socket_writer import SOCKET_WRITER_EXTENSION, SocketWriter

#: The most a request line and its headers may take, as h11's default (uvicorn's ``h11_max_incomplete_event_size``).
MAX_HEAD_BYTES = 16 * 1024

UNPARSEABLE_REQUEST = "the request is not valid HTTP/1.1: check the request line and the header names and values"


class ServiceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering unparseable and oversized request heads with a JSON 400."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True
        self._heads_completed = 0
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        was_reading_head, heads_completed = self._reading_head, self._heads_completed
        super().data_received(data)
        # Counted after parsing, so a read that also carries a body (or ends one) never counts against a head; only
        # reads that begin inside a head and complete none add up (a head completed is the only way out of one).
        if not was_reading_head or heads_completed != self._heads_completed:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._send_json_400(f"the request line and headers are longer than {MAX_HEAD_BYTES // 1024} KiB")

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._heads_completed += 1
        self._head_bytes = 0
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not for a connection upgrade, which makes no cycle
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[SOCKET_WRITER_EXTENSION] = functools.partial(_socket_writer_for, cycle)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this for a request httptools cannot parse; its own message says no more than ours.
        self._send_json_400(UNPARSEABLE_REQUEST)

    def _send_json_400(self, message: str) -> None:
        body = msgspec.json.encode(error_body("invalid_request", message))
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def _socket_writer_for(cycle: RequestResponseCycle) -> SocketWriter | None:
    # Only inside a chunked body: the engine thread frames its chunks as uvicorn frames the loop's.
    if cycle.response_complete or cycle.disconnected or cycle.chunked_encoding is not True:
        return None
    return SocketWriter.for_transport(cycle.transport)


def uvicorn_config(app: Any, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration every server of this app uses (the CLI, the tests, the benchmark scripts)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=ServiceHttpProtocol,
        log_config=None,
        access_log=False,
        **options,
    )
