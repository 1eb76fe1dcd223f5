"""Stop work for clients that went away, for answers that are not streamed.

A streamed answer notices a disconnect on its own (Litestar cancels the stream). A plain JSON answer does not: the
handler just awaits the result. :func:`unless_disconnected` runs the work beside a watcher on the ASGI ``receive``
channel and cancels the work when the client disconnects, so its generation stops within a token or two.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

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
