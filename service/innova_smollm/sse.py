"""Server-Sent Events framing for the native stream, and the response that carries it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.response import Stream
from litestar.response.base import ASGIResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encoder = msgspec.json.Encoder()


def frame(event: str | None, data: Any) -> bytes:
    """One SSE message. JSON never contains a raw newline, so a single ``data:`` line is always enough."""
    payload = data if isinstance(data, bytes) else _encoder.encode(data)
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + payload + b"\n\n"


class EventStream(Stream):
    """A Stream that keeps its own media type.

    Litestar gives the handler's default media type (JSON, for handlers that also answer JSON) precedence over the
    Stream's (``Stream.to_asgi_response``), which would label an SSE body ``application/json``.
    """

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> EventStream:
    return EventStream(content=events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
