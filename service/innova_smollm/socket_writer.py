"""Writing a streamed answer's body chunks to the client's socket from the engine thread (see :mod:`sinks` for why).

What keeps this safe next to the event loop, which owns the connection:
- The engine thread writes only while the loop does not: from the moment the stream starts, when the transport has
  nothing buffered (the head and any opening chunk are already in the kernel), until the sink hands the stream back
  (:class:`~innova_smollm.sinks.Unsent`) or ends it (``Finished``), after which the loop writes again.
- The writer owns a duplicate of the connection's descriptor. A connection the loop closes keeps its socket until
  the duplicate is closed too, so the number of a closed descriptor, which the kernel may give to the next client,
  is never written to.
- A lock puts every write before the close: the engine thread can be inside a write when the loop ends the stream.
- A write never blocks: the descriptor is non-blocking (a duplicate shares the flag with the transport's), so what
  the socket does not take at once is returned, for the loop to write.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from innova_smollm.sinks import DirectText

#: ASGI scope extension a server offers for this: a callable that returns a :class:`SocketWriter` for the response
#: being streamed, or None when it cannot have one (``http_server.ServiceHttpProtocol`` offers it).
SOCKET_WRITER_EXTENSION = "innova.socket_writer"


class SocketWriter:
    """HTTP/1.1 chunks written straight to a connection's socket, from any thread."""

    #: Writers made, and writes the socket did not take whole so the loop took over, since start (diagnostics, tests).
    opened = 0
    handed_back = 0

    def __init__(self, transport: asyncio.WriteTransport, fd: int) -> None:
        self._transport = transport
        self._fd = fd
        self._lock = threading.Lock()

    @classmethod
    def for_transport(cls, transport: asyncio.WriteTransport) -> SocketWriter | None:
        """A writer for the transport's socket, or None when the engine thread must not write to it."""
        if transport.is_closing() or transport.get_write_buffer_size() or transport.get_extra_info("sslcontext"):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return None
        if os.get_blocking(fd):
            os.close(fd)
            return None
        SocketWriter.opened += 1
        return cls(transport, fd)

    def write_chunk(self, payload: bytes) -> bytes:
        """Write ``payload`` as one chunk; return what the socket did not take. OSError: the connection is gone."""
        data = b"%x\r\n%b\r\n" % (len(payload), payload)
        with self._lock:
            if self._fd < 0:
                raise BrokenPipeError("the stream has ended")
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
        if written < len(data):
            SocketWriter.handed_back += 1
        return data[written:]

    def write_on_loop(self, data: bytes) -> None:
        """Write bytes the socket did not take from the engine thread; only on the event loop, through the transport,
        so that everything the loop writes afterwards follows them."""
        self._transport.write(data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def direct_text_for(scope: Mapping[str, Any], frame: Callable[[str], bytes]) -> Callable[[], DirectText | None]:
    """What ``SmolLMService.open_stream`` calls as the stream starts, once the response's head is written."""

    def open_direct() -> DirectText | None:
        offer = scope.get("extensions", {}).get(SOCKET_WRITER_EXTENSION)
        writer = offer() if offer is not None else None
        return None if writer is None else DirectText(frame, writer)

    return open_direct
