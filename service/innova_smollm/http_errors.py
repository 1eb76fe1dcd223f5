"""The one place where errors become HTTP responses.

Every error answer has the body ``{"error": {"type", "message", "field"?, "details"?}}`` with a stable ``type``.
Unexpected exceptions become a 500 with a generic message: the stack trace goes to the log, never to the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from innova_smollm.errors import (
    AuthenticationError,
    GenerationError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
    SmolLMError,
)
from innova_smollm.requestlog import note

log = logging.getLogger(__name__)

#: Error types that a generic HTTPException status maps to.
_TYPES_BY_STATUS = {
    400: "invalid_request",
    401: "authentication_error",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

_FIELD_IN_MESSAGE = re.compile(r"at `\$\.?([^`]*)`")


class JSONBodyRequest(Request[Any, Any, Any]):
    """Litestar's request, with every undecodable JSON body a 400.

    Litestar turns msgspec's ``DecodeError`` into a 400, but invalid UTF-8 inside a string raises
    ``UnicodeDecodeError`` and deeply nested arrays or objects raise ``RecursionError``: both escaped as 500s.
    """

    async def json(self) -> Any:
        try:
            return await super().json()
        except UnicodeDecodeError:
            raise SerializationException("the request body is not valid UTF-8") from None
        except RecursionError:
            raise SerializationException("the request body's JSON is nested too deeply") from None


def error_body(
    type_: str, message: str, *, field: str | None = None, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field:
        error["field"] = field
    if details:
        error["details"] = dict(details)
    return {"error": error}


def type_of_status(status: int) -> str:
    return _TYPES_BY_STATUS.get(status, "http_error" if status < 500 else "server_error")


def status_of(exc: SmolLMError) -> int:
    if isinstance(exc, InvalidRequestError):
        return HTTP_400_BAD_REQUEST
    if isinstance(exc, AuthenticationError):
        return HTTP_401_UNAUTHORIZED
    if isinstance(exc, QueueFullError | NotReadyError | RequestTimeoutError):
        return HTTP_503_SERVICE_UNAVAILABLE
    if isinstance(exc, GenerationError):
        return HTTP_500_INTERNAL_SERVER_ERROR
    return HTTP_500_INTERNAL_SERVER_ERROR


def headers_of(exc: SmolLMError) -> dict[str, str]:
    if isinstance(exc, QueueFullError):
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, NotReadyError) and exc.retry_after_s is not None:
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, RequestTimeoutError):
        return {"Retry-After": "5"}
    if isinstance(exc, AuthenticationError):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def describe_validation(exc: ValidationException) -> tuple[str, str | None]:
    """A message naming the field from Litestar's validation report."""
    field: str | None = None
    reasons: list[str] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", ""))
        key = item.get("key")
        match = _FIELD_IN_MESSAGE.search(message)
        name = match.group(1) if match else (str(key) if key else None)
        field = field or name
        reasons.append(message if not name or name in message else f"{name}: {message}")
    detail = "; ".join(reasons) or str(exc.detail)
    if detail.startswith("Validation failed for "):
        detail = "invalid request body"
    return f"{detail}", field


def _smollm_error(request: Request[Any, Any, Any], exc: SmolLMError) -> Response[Any]:
    note(request.scope, error_type=exc.type)
    field = exc.field if isinstance(exc, InvalidRequestError) else None
    details = {k: v for k, v in exc.details.items() if v is not None} or None
    if status_of(exc) >= 500 and not isinstance(exc, NotReadyError | QueueFullError | RequestTimeoutError):
        log.error("request failed: %s", exc.message, extra={"event": "request_failed", "error_type": exc.type})
    return Response(
        error_body(exc.type, exc.message, field=field, details=details),
        status_code=status_of(exc),
        headers=headers_of(exc),
        media_type=MediaType.JSON,
    )


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    note(request.scope, error_type="invalid_request")
    message, field = describe_validation(exc)
    return Response(
        error_body("invalid_request", message, field=field), status_code=HTTP_400_BAD_REQUEST, media_type=MediaType.JSON
    )


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    type_ = type_of_status(status)
    note(request.scope, error_type=type_)
    message = str(exc.detail) if exc.detail else type_.replace("_", " ")
    headers = dict(exc.headers or {})
    return Response(error_body(type_, message), status_code=status, headers=headers, media_type=MediaType.JSON)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, extra={"event": "unhandled_error"})
    note(request.scope, error_type="server_error")
    return Response(
        error_body("server_error", "the server hit an unexpected error; it is logged, and the request can be retried"),
        status_code=HTTP_500_INTERNAL_SERVER_ERROR,
        media_type=MediaType.JSON,
    )


ExceptionHandler = Callable[[Request[Any, Any, Any], Any], Response[Any]]

EXCEPTION_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    SmolLMError: _smollm_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}
