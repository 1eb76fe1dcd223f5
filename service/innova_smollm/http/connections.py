"""Connection guard: bounds on what a client may hold without completing a request, and on stalled transfers.

stock uvicorn + httptools has no bound on a request head's size or duration: a connection that sends nothing, or
half a head, stays open for ever, and a head is buffered whatever its size (measured: a 2 MB head sent in pieces was
held without an answer). nginx (``client_header_timeout``, ``large_client_header_buffers``), HAProxy
(``timeout http-request``) and llama-server bound these; this module does it for the service.

Design, and why:

- :class:`GuardedConnection` is an ``asyncio.Protocol`` that *wraps by composition* the protocol class uvicorn
  would use itself (``Config(http="httptools").load()`` then the public ``Config.http_protocol_class``), made with
  the keyword arguments uvicorn passes its protocol factory. uvicorn gets the wrapper class through its public
  ``http=`` option. The wrapper sees every transport callback first and forwards it. Nothing imports from
  uvicorn's protocol modules or subclasses a uvicorn class, so an uvicorn upgrade can change its protocol's insides
  without breaking the guard; what the guard relies on is asyncio's Protocol interface and the ASGI interface.
- While a connection waits for a request head, the wrapper counts the head's bytes itself: a head ends at the first
  CRLF CRLF after its first byte that is not CR or LF (llhttp accepts only CRLF line ends, and skips blank lines
  before a request line, which count against the cap here). A head over :data:`MAX_HEAD_BYTES` (16 KiB, as h11 and
  the protocol subclass this service had before) gets the service's JSON 400; a head not complete within
  SMOLLM_HEAD_TIMEOUT_S of the connection opening (or of the first byte after a keep-alive pause) gets a JSON 408;
  either way the connection closes. A connection that sent nothing is closed without an answer.
- The wrapper learns when the app started and finished a request from :class:`ConnectionHooks`, an ASGI middleware
  around the whole app. They are linked by a context variable that the wrapper sets while it hands bytes to
  uvicorn's protocol: uvicorn starts the request's task from inside that call, and a task copies the context it is
  created in, so the request's middleware finds its own connection. (Linking by the scope's ``client`` address,
  the other choice, breaks behind a local proxy: uvicorn's proxy-headers middleware rewrites ``client`` from
  ``X-Forwarded-For`` for trusted peers, which by default is loopback, where this service listens.)
- Stalls while a request runs are the middleware's: a body read that waits longer than SMOLLM_IO_TIMEOUT_S
  answers a JSON 408 and closes; an answer whose client takes no byte for SMOLLM_IO_TIMEOUT_S (the transport's
  write buffer does not shrink) has its connection aborted, which the app sees as a disconnect, so the engine
  frees the request's sequence at once. Idle keep-alive connections are uvicorn's ``timeout_keep_alive``
  (SMOLLM_KEEP_ALIVE_S); the wrapper only backs it up, and aborts a close that cannot flush (a client that never
  reads) after SMOLLM_IO_TIMEOUT_S.
- Descriptors: the service holds at most ``max_connections`` connections, derived from the process's open-file
  limit (RLIMIT_NOFILE, which the systemd unit's LimitNOFILE sets) less a reserve for the model, logs and metrics.
  A new connection past it first evicts the oldest connection that is waiting for a head (idle keep-alive or
  unfinished head, as nginx reuses keep-alive connections), so health still answers while a flood holds every
  slot; only when every connection is inside a request is the newcomer refused (a JSON 503 and close).

What is not covered: after a request whose body the app did not read to the end (a 413, a 401), or on a
connection that pipelines, the next head's bytes cannot be told apart from the last body's without parsing HTTP
framing; such a connection gets the head timeout but not the 16 KiB cap, and every connection is bounded by
``max_request_bytes`` of raw bytes between a head and the end of its answer. Unix-socket servers are guarded the
same way (nothing here depends on addresses).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import msgspec
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from innova_smollm.http.errors import error_body
from innova_smollm.http.requestlog import note

log = logging.getLogger(__name__)

#: The most a request line and its headers may take, as h11's default (uvicorn's ``h11_max_incomplete_event_size``).
MAX_HEAD_BYTES = 16 * 1024

#: Descriptors kept free of connections: 10 % of the limit, at least 64 and at most 1024.
_RESERVE_MIN, _RESERVE_MAX = 64, 1024

_TERMINATOR = b"\r\n\r\n"

#: After an error answer the guard stops sending (FIN) but goes on reading and dropping what the client still sends,
#: for at most this long, then closes: closing with unread bytes would make the kernel send a reset, which can
#: destroy the answer before the client reads it (nginx's lingering close).
LINGER_S = 2.0
_BLANK = b"\r\n"


def max_connections_for(nofile: int) -> int:
    """Connections the service holds with an open-file limit of ``nofile``: the limit less a reserve."""
    reserve = min(_RESERVE_MAX, max(_RESERVE_MIN, nofile // 10))
    return max(16, nofile - reserve)


def open_file_limit() -> int:
    """The process's soft RLIMIT_NOFILE (what the unit's LimitNOFILE sets), or 1024 when it is unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(frozen=True, kw_only=True)
class ConnectionPolicy:
    head_timeout_s: float = 10.0
    io_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024
    max_head_bytes: int = MAX_HEAD_BYTES
    #: Raw bytes a connection may send between the end of a head and the end of its answer (body and framing), and
    #: while the guard cannot tell a next head from the rest of a body.
    max_request_bytes: int = 4 * 1_048_576


class HeadTooLargeError(Exception):
    pass


class HeadScanner:
    """Finds where a request head ends in the bytes of a connection, and counts them (pure logic)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._started = False
        self._tail = b""

    def reset(self) -> None:
        self.size, self._started, self._tail = 0, False, b""

    def feed(self, data: bytes) -> int | None:
        """The offset in ``data`` just past the head's end, or None while the head goes on.

        Raises :class:`HeadTooLargeError` once the head (leading blank lines included) is over the limit.
        """
        start = 0
        if not self._started:
            start = len(data) - len(data.lstrip(_BLANK))
            if start == len(data):
                self._count(len(data))
                return None
            self._started = True
        window = self._tail + data[start:]
        found = window.find(_TERMINATOR)
        if found >= 0:
            end = start + found + len(_TERMINATOR) - len(self._tail)
            self._count(end)
            return end
        self._count(len(data))
        self._tail = window[-(len(_TERMINATOR) - 1) :]
        return None

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.limit:
            raise HeadTooLargeError


class Phase(enum.Enum):
    #: Waiting for a request head (fresh, or idle after an answer); the head is counted against the cap.
    HEAD = "head"
    #: A head was seen; the app has the request until its answer ends.
    REQUEST = "request"
    #: An answer ended but bytes may already belong to the next request: the head timeout applies, not the cap.
    UNSURE = "unsure"
    CLOSED = "closed"


@dataclass
class ConnectionTable:
    """The connections of one server: how many are open, which wait for a head (oldest first), why some closed."""

    policy: ConnectionPolicy
    open: int = 0
    waiting: dict[GuardedConnection, None] = field(default_factory=dict)
    closed: dict[str, int] = field(default_factory=dict)
    _last_report: float = 0.0
    _reported: dict[str, int] = field(default_factory=dict)

    def count_close(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1
        now = time.monotonic()
        # One summary line a minute at most, so a flood of bad connections never floods the log.
        if now - self._last_report >= 60.0:
            since = {k: v - self._reported.get(k, 0) for k, v in self.closed.items() if v != self._reported.get(k, 0)}
            self._last_report, self._reported = now, dict(self.closed)
            log.warning(
                "closed connections that broke the connection bounds: %s",
                ", ".join(f"{k}={v}" for k, v in sorted(since.items())),
                extra={"event": "connections_closed", "closed": since, "open": self.open},
            )


#: The connection whose bytes uvicorn's protocol is handling right now; a request's task inherits it.
_current: contextvars.ContextVar[GuardedConnection | None] = contextvars.ContextVar(
    "innova_smollm_connection", default=None
)


class GuardedConnection(asyncio.Protocol):
    """uvicorn's HTTP protocol, wrapped: see the module docstring. Made per server by :func:`guarded_protocol`."""

    inner_factory: ClassVar[Callable[..., asyncio.Protocol]]
    table: ClassVar[ConnectionTable]

    def __init__(self, **kwargs: Any) -> None:
        self.inner = self.inner_factory(**kwargs)
        self.policy = self.table.policy
        self.loop: asyncio.AbstractEventLoop = kwargs.get("_loop") or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.HEAD
        self.scanner = HeadScanner(self.policy.max_head_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._idle_after_answer = False
        self._request_bytes = 0
        self._body_done = True
        self._late_bytes = False
        self._request_open = False
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._counted = False
        self._inner_made = False
        #: Which request the app holds (the middleware's reports carry it, so a late report of an earlier
        #: pipelined request cannot end a later one).
        self._request_id = 0

    # --- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport's methods without deriving from it.
        self.transport = transport = cast(asyncio.Transport, transport)
        table = self.table
        table.open += 1
        self._counted = True
        if table.open > self.policy.max_connections:
            oldest = next(iter(table.waiting), None)
            if oldest is not None:
                oldest._close("evicted", abort=True)
            else:
                self._reject(503, "overloaded", "the service holds all the connections it can; retry shortly")
                return
        self._wait_for_head(self.policy.head_timeout_s)
        self._inner_made = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.HEAD:
            if self._idle_after_answer:
                self._idle_after_answer = False
                self._arm(self.policy.head_timeout_s)
            try:
                end = self.scanner.feed(data)
            except HeadTooLargeError:
                self._reject(400, "request_too_large", f"the request line and headers are over {_kib(self)} KiB")
                return
            if end is not None:
                self._enter_request(body_done=False)
                self._request_bytes = len(data) - end
        else:
            self._request_bytes += len(data)
            if self._body_done and self._request_open:
                self._late_bytes = True
            if self._request_bytes > self.policy.max_request_bytes:
                self._close("too_many_bytes", abort=True)
                return
        token = _current.set(self)
        try:
            self.inner.data_received(data)
        finally:
            _current.reset(token)

    def eof_received(self) -> bool | None:
        if self.phase is Phase.CLOSED or not self._inner_made:
            return None  # the transport closes itself
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self.table.waiting.pop(self, None)
        if self._counted:
            self._counted = False
            self.table.open -= 1
        self._writable.set()
        if self._inner_made:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._writable.clear()
        if self._inner_made:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.set()
        if self._inner_made:
            self.inner.resume_writing()

    # --- what the ASGI middleware reports ------------------------------------------------------------------

    def request_started(self, *, has_body: bool) -> int:
        """A request's app began; returns the id its later reports carry."""
        self._request_id += 1
        if self.phase is not Phase.CLOSED:
            self._enter_request(body_done=not has_body)
            self._request_bytes = 0
            self._request_open = True
        return self._request_id

    def body_complete(self, request_id: int) -> None:
        if request_id == self._request_id:
            self._body_done = True

    def request_finished(self, request_id: int) -> None:
        """The app is done with the request (its answer ended, or it failed): wait for the next head."""
        if request_id != self._request_id or self.phase is not Phase.REQUEST or not self._request_open:
            return
        self._request_open = False
        unsure = self._late_bytes or not self._body_done
        self.scanner.reset()
        # Idle keep-alive is uvicorn's to close; this timer only backs it up (and aborts a close that cannot flush).
        backstop = self.policy.keep_alive_s + self.policy.head_timeout_s
        self.phase = Phase.UNSURE if unsure else Phase.HEAD
        if not unsure:
            self._request_bytes = 0
        self._idle_after_answer = not unsure
        self._waiting(True)
        self._arm(backstop)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def wait_writable(self) -> bool:
        """Wait until the client takes the answer's bytes; False (and the connection aborted) if it takes none for
        the I/O timeout."""
        transport = self.transport
        if transport is None:
            return False
        last = transport.get_write_buffer_size()
        while self._write_paused and self.phase is not Phase.CLOSED:
            try:
                async with asyncio.timeout(self.policy.io_timeout_s):
                    await self._writable.wait()
            except TimeoutError:
                size = transport.get_write_buffer_size()
                if size >= last:
                    self._close("send_stalled", abort=True)
                    return False
                last = size
        return self.phase is not Phase.CLOSED

    def body_stalled(self) -> None:
        """A body read waited past the I/O timeout; the app answers 408 and the connection must not be reused."""
        self.table.count_close("body_stalled")

    # --- internals -----------------------------------------------------------------------------------------

    def _enter_request(self, *, body_done: bool) -> None:
        self.phase = Phase.REQUEST
        self._body_done = body_done
        self._late_bytes = False
        self._idle_after_answer = False
        self._waiting(False)
        self._cancel_timer()

    def _wait_for_head(self, timeout: float) -> None:
        self.phase = Phase.HEAD
        self.scanner.reset()
        self._waiting(True)
        self._arm(timeout)

    def _waiting(self, waiting: bool) -> None:
        if waiting:
            self.table.waiting[self] = None
        else:
            self.table.waiting.pop(self, None)

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or self.phase is Phase.REQUEST:
            return
        if self.phase is Phase.CLOSED and not transport.is_closing():
            transport.close()  # the end of a lingering close
            self._arm(self.policy.io_timeout_s)
        elif transport.is_closing() or self.phase is Phase.CLOSED:
            # A close that could not flush its buffer (a client that never reads): drop the buffer.
            self._close("close_stalled", abort=True)
        elif self.phase is Phase.HEAD and self.scanner.size > 0:
            self._reject(408, "request_timeout", f"the request head was not complete within {_secs(self)} s")
        else:
            self._close("idle" if self.phase is Phase.HEAD else "head_timeout", abort=False)

    def _reject(self, status: int, type_: str, message: str) -> None:
        """Answer a JSON error and close, lingering (see :data:`LINGER_S`)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(_error_response(status, type_, message))
        if not transport.can_write_eof():
            self._close(type_, abort=False)
            return
        self.table.count_close(type_)
        self.phase = Phase.CLOSED
        self._waiting(False)
        transport.write_eof()
        self._arm(min(LINGER_S, self.policy.io_timeout_s))

    def _close(self, reason: str, *, abort: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.phase is not Phase.CLOSED:
            self.table.count_close(reason)
        self.phase = Phase.CLOSED
        self._waiting(False)
        if abort:
            self._cancel_timer()
            transport.abort()
        else:
            transport.close()
            self._arm(self.policy.io_timeout_s)  # then abort, if the close could not flush


def _kib(connection: GuardedConnection) -> int:
    return connection.policy.max_head_bytes // 1024


def _secs(connection: GuardedConnection) -> str:
    return f"{connection.policy.head_timeout_s:g}"


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def _error_response(status: int, type_: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with the service's JSON error body, closing the connection."""
    body = msgspec.json.encode(error_body(type_, message))
    head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))]
    head.append(b"content-type: application/json\r\n")
    head.append(b"content-length: %d\r\n" % len(body))
    if status == 503:
        head.append(b"retry-after: 1\r\n")
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body


def guarded_protocol(inner: Callable[..., asyncio.Protocol], policy: ConnectionPolicy) -> type[GuardedConnection]:
    """A protocol class for uvicorn's ``http=`` option: ``inner`` (uvicorn's own protocol class) behind the guard,
    with one :class:`ConnectionTable` for the server."""
    table = ConnectionTable(policy)
    namespace = {"inner_factory": staticmethod(inner), "table": table}
    guarded: type[GuardedConnection] = type("GuardedHttpProtocol", (GuardedConnection,), namespace)
    return guarded


class ConnectionHooks:
    """ASGI middleware around the whole app: tells the request's connection guard when a request starts, when its
    body is complete and when its answer ends, and bounds body reads and answer writes by the I/O timeout.

    Without a guard (an app served some other way) it passes everything through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = _current.get()
        if connection is None or scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        has_body = _has_body(scope.get("headers", ()))
        request_id = connection.request_started(has_body=has_body)
        body_open = has_body
        io_timeout = connection.policy.io_timeout_s

        async def guarded_receive() -> ReceiveMessage:
            nonlocal body_open
            if not body_open:
                return await receive()
            try:
                async with asyncio.timeout(io_timeout):
                    message = await receive()
            except TimeoutError:
                body_open = False
                connection.body_stalled()
                raise BodyStalledError(io_timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_open = False
                connection.body_complete(request_id)
            return message

        async def guarded_send(message: Message) -> None:
            if connection.write_paused and not await connection.wait_writable():
                note(scope, closed="send_stalled")
                return  # aborted: the app learns of the disconnect from receive, as for any client that left
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                connection.request_finished(request_id)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            connection.request_finished(request_id)


def _has_body(headers: Any) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


class BodyStalledError(HTTPException):
    """Raised into the app by a body read that waited past the I/O timeout: the app's error handling answers it
    as a JSON 408 that closes the connection (what was sent of the body cannot be told from a next request)."""

    status_code = 408

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            detail=f"the request body stopped arriving: nothing came for {timeout_s:g} s",
            headers={"Connection": "close"},
        )


def policy_from(settings: Any, nofile: int | None = None) -> ConnectionPolicy:
    """The bounds of :class:`~innova_smollm.settings.Settings` (and of the open-file limit) for the guard."""
    limit = open_file_limit() if nofile is None else nofile
    return ConnectionPolicy(
        head_timeout_s=settings.head_timeout_s,
        io_timeout_s=settings.io_timeout_s,
        keep_alive_s=float(settings.keep_alive_s),
        max_connections=max_connections_for(limit),
        max_request_bytes=4 * settings.max_body_bytes + MAX_HEAD_BYTES,
    )


def describe(policy: ConnectionPolicy) -> Mapping[str, Any]:
    return {
        "head_timeout_s": policy.head_timeout_s,
        "io_timeout_s": policy.io_timeout_s,
        "keep_alive_s": policy.keep_alive_s,
        "max_connections": policy.max_connections,
        "max_head_bytes": policy.max_head_bytes,
    }
