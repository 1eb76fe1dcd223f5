"""The one place where errors become HTTP responses, in the wire format of the API the path belongs to.

Native paths answer ``{"error": {"type", "message", "field"?, "details"?}}`` with a stable ``type``; paths under
``/v1`` answer OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (:data:`ErrorFormat` is the parameter, and
the path decides, so a 404 for an unknown ``/v1/...`` path is in OpenAI's shape too). Unexpected exceptions become a
500 with a generic message: the stack trace goes to the log, never to the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

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
    ServiceError,
)
from innova_smollm.http.openai import protocol as openai
from innova_smollm.http.requestlog import note

log = logging.getLogger(__name__)

#: Error types that a generic HTTPException status maps to.
_TYPES_BY_STATUS = {
    400: "invalid_request",
    401: "authentication_error",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

#: Where msgspec's messages name the field: "... - at `$.messages[0].role`" or "unknown field `max_token`".
_FIELD_AT = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


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


def status_of(exc: ServiceError) -> int:
    if isinstance(exc, InvalidRequestError):
        return HTTP_400_BAD_REQUEST
    if isinstance(exc, AuthenticationError):
        return HTTP_401_UNAUTHORIZED
    if isinstance(exc, QueueFullError | NotReadyError | RequestTimeoutError):
        return HTTP_503_SERVICE_UNAVAILABLE
    if isinstance(exc, GenerationError):
        return HTTP_500_INTERNAL_SERVER_ERROR
    return HTTP_500_INTERNAL_SERVER_ERROR


def headers_of(exc: ServiceError) -> dict[str, str]:
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
        at = _FIELD_AT.search(message)
        # Litestar gives the path as ``key``; "data" is the whole body, which names nothing.
        path = at.group(1) if at else (str(key) if key and key != "data" else None)
        unknown = _UNKNOWN_FIELD.search(message)
        name = path
        if unknown is not None:  # an unknown field is named by itself, below the object it was found in
            name = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        field = field or name
        reasons.append(message if not name or name in message else f"{name}: {message}")
    detail = "; ".join(reasons) or str(exc.detail)
    if detail.startswith("Validation failed for "):
        detail = "invalid request body"
    return f"{detail}", field


CLIENT_CLOSED_REQUEST = 499
"""Sent when a client went away before its answer was ready; nobody reads it (nginx's "client closed request")."""


class ErrorFormat(Protocol):
    """One API's error body."""

    def __call__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Any: ...


def native_error(
    status: int, type_: str, message: str, *, field: str | None = None, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return error_body(type_, message, field=field, details=details)


def openai_error(
    status: int, type_: str, message: str, *, field: str | None = None, details: Mapping[str, Any] | None = None
) -> Any:
    return openai.error_body(status, type_, message, field)


def format_of(path: str) -> ErrorFormat:
    """The error format of the API that ``path`` belongs to."""
    return openai_error if path == "/v1" or path.startswith("/v1/") else native_error


def message_of(exc: ServiceError, fmt: ErrorFormat) -> str:
    """The error's message; OpenAI clients match the start of an over-long prompt's message to trim history."""
    if fmt is openai_error:
        return openai.message_of(exc)
    return exc.message


def service_error_body(exc: ServiceError, fmt: ErrorFormat) -> Any:
    """The body of a domain error, for a response or the last event of a stream."""
    field = exc.field if isinstance(exc, InvalidRequestError) else None
    details = {k: v for k, v in exc.details.items() if v is not None} or None
    return fmt(status_of(exc), exc.type, message_of(exc, fmt), field=field, details=details)


def _respond(
    request: Request[Any, Any, Any], status: int, body: Any, headers: Mapping[str, str] | None = None
) -> Response[Any]:
    return Response(body, status_code=status, headers=dict(headers or {}), media_type=MediaType.JSON)


def _service_error(request: Request[Any, Any, Any], exc: ServiceError) -> Response[Any]:
    note(request.scope, error_type=exc.type)
    if status_of(exc) >= 500 and not isinstance(exc, NotReadyError | QueueFullError | RequestTimeoutError):
        log.error("request failed: %s", exc.message, extra={"event": "request_failed", "error_type": exc.type})
    return _respond(request, status_of(exc), service_error_body(exc, format_of(request.url.path)), headers_of(exc))


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    note(request.scope, error_type="invalid_request")
    message, field = describe_validation(exc)
    fmt = format_of(request.url.path)
    return _respond(request, HTTP_400_BAD_REQUEST, fmt(HTTP_400_BAD_REQUEST, "invalid_request", message, field=field))


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    type_ = type_of_status(status)
    note(request.scope, error_type=type_)
    message = str(exc.detail) if exc.detail else type_.replace("_", " ")
    fmt = format_of(request.url.path)
    return _respond(request, status, fmt(status, type_, message), exc.headers)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, extra={"event": "unhandled_error"})
    note(request.scope, error_type="server_error")
    message = "the server hit an unexpected error; it is logged, and the request can be retried"
    fmt = format_of(request.url.path)
    return _respond(
        request, HTTP_500_INTERNAL_SERVER_ERROR, fmt(HTTP_500_INTERNAL_SERVER_ERROR, "server_error", message)
    )


ExceptionHandler = Callable[[Request[Any, Any, Any], Any], Response[Any]]

EXCEPTION_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    ServiceError: _service_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}
