"""The limit on HTTP requests handled at once (SMOLLM_MAX_REQUESTS): it counts requests, never connections.

uvicorn's ``limit_concurrency``, used before, counted open connections as well as requests, so a hundred idle
connections made every route answer uvicorn's plain-text 503, health included. :class:`RequestLimit` is an ASGI
middleware that counts requests inside the app only; past the limit the answer is the service's JSON 503 (in the
path's API format) with ``Retry-After``. Health and ``/metrics`` are never counted nor refused: they are how
operators and balancers learn that the host is alive. The engine's own admission (SMOLLM_PARALLEL running,
SMOLLM_MAX_QUEUE waiting, 503 ``queue_full`` past them) stays as it is, inside this limit.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from innova_smollm.http.errors import format_of
from innova_smollm.http.requestlog import note

#: Paths that always answer: readiness and metrics.
ALWAYS_ANSWERED = frozenset({"/innova/api/smollm/health", "/metrics"})

RETRY_AFTER_S = 1


class RequestLimit:
    """ASGI middleware: at most ``limit`` requests in the app at once, the paths in ``exempt`` not counted."""

    def __init__(self, app: ASGIApp, *, limit: int, exempt: Iterable[str] = ALWAYS_ANSWERED) -> None:
        self.app = app
        self.limit = limit
        self.exempt = frozenset(exempt)
        self.in_flight = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or _path(scope) in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.refused += 1
            await self._refuse(scope, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(self, scope: Scope, send: Send) -> None:
        note(scope, error_type="overloaded")
        path = scope.get("path", "")
        message = (
            f"the service is handling {self.in_flight} requests, its limit (SMOLLM_MAX_REQUESTS); "
            f"retry in {RETRY_AFTER_S} s"
        )
        body = msgspec.json.encode(format_of(path)(503, "overloaded", message))
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    return path.rstrip("/") or "/"
