"""Streaming to HTTP clients: Server-Sent Events framing, the response that carries it, and disconnect watching.

A streamed answer notices a disconnect on its own (Litestar cancels the stream). A plain JSON answer does not: the
handler just awaits the result. :func:`unless_disconnected` runs the work beside a watcher on the ASGI ``receive``
channel and cancels the work when the client disconnects, so its generation stops within a token or two.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import msgspec
from litestar import Request, Response
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import Scope

from innova_smollm.core.service import Chunk, ModelService, Outcome, Prepared
from innova_smollm.errors import ServiceError
from innova_smollm.http.errors import CLIENT_CLOSED_REQUEST, ErrorFormat, service_error_body
from innova_smollm.http.requestlog import note, note_outcome

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


T = TypeVar("T")

Receive = Callable[[], Awaitable[Any]]


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
    """The work's result (or its exception, as is), or None when the client disconnected first."""
    work_task = asyncio.ensure_future(work())
    watch_task = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        return None
    finally:
        for task in (watch_task, work_task):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class Wire(Protocol):
    """How one API shapes an answer: whole, or as the SSE frames of a stream."""

    #: The API's error body, for an error that ends a stream after its 200 was sent.
    error_format: ErrorFormat

    def whole(self, outcome: Outcome) -> Any:
        """The body of a whole answer."""
        ...

    def opening(self) -> Sequence[bytes]:
        """Frames sent before the first text."""
        ...

    def text(self, chunk: Chunk) -> bytes:
        """The frame of one text chunk (of one choice, with its tokens' log probabilities when asked for)."""
        ...

    def closing(self, outcome: Outcome) -> Sequence[bytes]:
        """Frames that end a stream that finished."""
        ...

    def failure(self, error_body: Any) -> Sequence[bytes]:
        """Frames that end a stream that failed after its 200: the API's error body, and its end marker if any."""
        ...


async def collect(stream: AsyncIterator[Chunk | Outcome]) -> Outcome:
    async for item in stream:
        if isinstance(item, Outcome):
            return item
    raise RuntimeError("the answer stream ended without an outcome")  # pragma: no cover - service invariant


async def answer(
    request: Request[Any, Any, Any], service: ModelService, prepared: Prepared, wire: Wire, *, stream: bool
) -> Any:
    """Run a prepared request as a whole answer or as a stream of SSE frames, for either API.

    Admission happens here, before any byte is sent, so a full queue is still a plain 503 with Retry-After. A whole
    answer stops generating when its client disconnects, and answers 499 to nobody.
    """
    if stream:
        return sse_response(_frames(service.open_stream(prepared), wire, request.scope))
    whole = service.open_stream(prepared, live_text=False)
    outcome = await unless_disconnected(request.receive, lambda: collect(whole))
    if outcome is None:
        note(request.scope, finish_reason="cancelled")
        body = wire.error_format(CLIENT_CLOSED_REQUEST, "cancelled", "the client disconnected")
        return Response(body, status_code=CLIENT_CLOSED_REQUEST)
    note_outcome(request.scope, outcome)
    return wire.whole(outcome)


async def _frames(stream: AsyncIterator[Chunk | Outcome], wire: Wire, scope: Scope) -> AsyncIterator[bytes]:
    finished = False
    try:
        for opening in wire.opening():
            yield opening
        async for item in stream:
            if isinstance(item, Chunk):
                # A wire may hold text back (a chat answer that may turn out a tool call): then it frames nothing.
                if item.text and (text_frame := wire.text(item)):
                    yield text_frame
                continue
            finished = True
            note_outcome(scope, item)
            for closing in wire.closing(item):
                yield closing
    except ServiceError as exc:
        # Headers (200) are already sent; the error travels as the stream's last event.
        note(scope, error_type=exc.type)
        for failure in wire.failure(service_error_body(exc, wire.error_format)):
            yield failure
    except (GeneratorExit, asyncio.CancelledError):
        if not finished:
            note(scope, finish_reason="cancelled")
        raise
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
