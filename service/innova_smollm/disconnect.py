"""Stop work for clients that went away, for answers that are not streamed.

A streamed answer notices a disconnect on its own (Litestar cancels the stream). A plain JSON answer does not: the
handler just awaits the result. :func:`unless_disconnected` runs the work beside a watcher on the ASGI ``receive``
channel and cancels the work when the client disconnects, so its generation stops within a token or two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

Receive = Callable[[], Awaitable[Any]]


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """The work's result, or None when the client disconnected first (the work is then cancelled)."""
    result: list[T] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await _wait_for_disconnect(receive)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result.append(await work())
        group.cancel_scope.cancel()
    return result[0] if result else None
