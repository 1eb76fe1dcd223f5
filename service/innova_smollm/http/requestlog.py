"""One JSON log line per HTTP request, and the per-request record that metrics count.

:class:`RequestLog` wraps the whole Litestar ASGI handler (outside its exception handling and routing), so every
request is seen with its final status: API calls, health probes, 401s, 404s and streams alike. Handlers and error
handlers add what only they know (token counts, timings, finish_reason, error type) with :func:`note`, which writes
into the ASGI scope's ``state`` that the handlers' ``Request`` shares.

Prompt and answer text may be noted by handlers, but :class:`RequestLog` drops it unless SMOLLM_LOG_CONTENT=true:
one place decides, so a handler cannot leak text into the log by mistake.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from innova_smollm.core.service import Outcome
from innova_smollm.logs import current_request_id

log = logging.getLogger("innova_smollm.requests")

REQUEST_ID_HEADER = "X-Request-ID"

#: Key of this module's fields in ``scope["state"]``.
_STATE_KEY = "innova_smollm.request"

#: Fields that carry user text; logged only when SMOLLM_LOG_CONTENT=true.
CONTENT_FIELDS = frozenset({"prompt", "messages", "answer"})

# A caller's id is echoed into logs and headers: accept only a short token-like value, never control characters.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def note(scope: Scope, **fields: Any) -> None:
    """Add fields to the current request's log line (and the metrics' view of it)."""
    scope["state"].setdefault(_STATE_KEY, {}).update(fields)


def note_outcome(scope: Scope, outcome: Outcome) -> None:
    speed = outcome.tokens_per_second
    note(
        scope,
        source=outcome.source.value,
        finish_reason=outcome.finish_reason.value,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        queue_ms=round(outcome.queue_s * 1000, 2),
        first_token_ms=None if outcome.first_token_s is None else round(outcome.first_token_s * 1000, 2),
        generation_ms=round(outcome.total_s * 1000, 2),
        tokens_per_second=None if speed is None else round(speed, 2),
        answer=outcome.text,
    )


def noted(scope: Scope) -> dict[str, Any]:
    fields: dict[str, Any] = scope["state"].get(_STATE_KEY, {})
    return fields


class RequestLog:
    """ASGI wrapper: assigns the request id, returns it as a header, then logs and reports the finished request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        log_content: bool,
        on_finish: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.app = app
        self.log_content = log_content
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id_of(scope)
        status = 500  # what the client sees if the app dies before starting a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
            self._finish(scope, request_id, status, time.perf_counter() - started)

    def _finish(self, scope: Scope, request_id: str, status: int, duration_s: float) -> None:
        route = scope.get("path_template") or None
        record: dict[str, Any] = {
            "event": "request",
            "request_id": request_id,
            "method": scope.get("method", ""),
            "route": route,
            "path": scope.get("path", ""),
            "status": status,
            "duration_ms": round(duration_s * 1000, 2),
        }
        for key, value in noted(scope).items():
            if key in CONTENT_FIELDS and not self.log_content:
                continue
            record[key] = value
        if self.on_finish is not None:
            try:
                self.on_finish(record)
            except Exception:  # accounting must never turn a served request into an error
                log.exception("request accounting failed", extra={"event": "request_accounting_failed"})
        log.log(_level_of(status, record["path"]), "%s %s %s", record["method"], record["path"], status, extra=record)


def _request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _level_of(status: int, path: str) -> int:
    """503 is a documented answer (loading, busy, disabled), not a fault: only other 5xx are errors.

    A 503 from a health probe is how readiness is reported, so it is routine; elsewhere it means a caller was
    turned away, worth a warning.
    """
    if status == 503:
        return logging.INFO if path.endswith("/health") else logging.WARNING
    return logging.ERROR if status >= 500 else logging.INFO
