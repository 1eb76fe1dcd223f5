"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

They run on the same service as the native routes (same engine, admission queue, limits and cancellation); only
the wire shapes differ, and those live in :mod:`innova_smollm.openai_compat`. Errors on this router answer in
OpenAI's shape through the router-level exception handlers below, the one place this API's errors become HTTP.
Paths that match no route (404/405) are answered by the app and keep the native shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import anyio
from litestar import Controller, MediaType, Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_400_BAD_REQUEST, HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Scope

from innova_smollm import openai_compat as oai
from innova_smollm.disconnect import unless_disconnected
from innova_smollm.errors import SmolLMError
from innova_smollm.http_errors import describe_validation, headers_of, status_of, type_of_status
from innova_smollm.requestlog import note, note_outcome
from innova_smollm.routes.smollm import CLIENT_CLOSED_REQUEST, collect
from innova_smollm.service import Outcome, Prepared, SmolLMService
from innova_smollm.socket_writer import direct_text_for
from innova_smollm.sse import frame, sse_response

log = logging.getLogger(__name__)

W = TypeVar("W")

DONE = b"data: [DONE]\n\n"


class OpenAIController(Controller):
    path = "/"
    tags = ["openai"]

    @post(
        "/chat/completions",
        summary="Chat completion (OpenAI-compatible)",
        description="The OpenAI Chat Completions API for the local model. Unknown fields are ignored; `model` is "
        "ignored (one model is served); `stream: true` answers as SSE `data:` chunks ending with `data: [DONE]`.",
        status_code=HTTP_200_OK,
    )
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[oai.ChatCompletionRequest],
        service: NamedDependency[SmolLMService],
    ) -> oai.ChatCompletion | Response[Any]:
        messages = oai.messages_of(data)
        options = oai.options_of(data)
        note(request.scope, messages=[{"role": m.role, "content": m.content} for m in messages])
        # Rendering the template and tokenizing a long conversation is CPU work: keep it off the event loop.
        prepared = await anyio.to_thread.run_sync(service.prepare_chat, messages, options)
        answer = oai.ChatAnswer(model_name(service, prepared))
        return await _answer(request, service, prepared, answer, data)

    @post(
        "/completions",
        summary="Text completion (OpenAI-compatible, legacy)",
        description="Continues `prompt` as raw text, without the chat template. Same conventions as chat.",
        status_code=HTTP_200_OK,
    )
    async def completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[oai.CompletionRequest],
        service: NamedDependency[SmolLMService],
    ) -> oai.Completion | Response[Any]:
        prompt = oai.prompt_of(data)
        options = oai.options_of(data)
        note(request.scope, prompt=prompt)
        prepared = await anyio.to_thread.run_sync(service.prepare_generate, prompt, options)
        answer = oai.CompletionAnswer(model_name(service, prepared))
        return await _answer(request, service, prepared, answer, data)

    @get("/models", summary="The served model (OpenAI-compatible)", sync_to_thread=False)
    def models(self, service: NamedDependency[SmolLMService]) -> oai.ModelList:
        return oai.ModelList(data=[oai.Model(id=served_model(service), created=_model_created(service))])


def served_model(service: SmolLMService) -> str:
    meta = service.metadata()
    return meta.name if meta is not None else service.settings.model_name


def model_name(service: SmolLMService, prepared: Prepared) -> str:
    return str(service.model_info(prepared.source)["model_name"])


def _model_created(service: SmolLMService) -> int:
    try:
        return int(service.settings.model_path.stat().st_mtime)
    except OSError:
        return 0


async def _answer(
    request: Request[Any, Any, Any],
    service: SmolLMService,
    prepared: Prepared,
    answer: oai.Framing[W],
    data: oai.Sampling,
) -> W | Response[Any]:
    # Admission happens here, before any byte is sent, so a full queue is still a plain 503 with Retry-After.
    if data.stream:
        # The engine thread writes the text chunks to the socket itself when the server allows it (socket_writer).
        open_direct = direct_text_for(request.scope, lambda text: frame(None, answer.text(text)))
        stream = service.open_stream(prepared, open_direct=open_direct)
        return sse_response(_events(stream, answer, request.scope, data.include_usage))
    stream = service.open_stream(prepared, live_text=False)
    outcome = await unless_disconnected(request.receive, lambda: collect(stream))
    if outcome is None:
        note(request.scope, finish_reason="cancelled")
        body = oai.error_body(CLIENT_CLOSED_REQUEST, "cancelled", "the client disconnected")
        return Response(body, status_code=CLIENT_CLOSED_REQUEST)
    note_outcome(request.scope, outcome)
    return answer.whole(outcome)


async def _events(
    stream: AsyncIterator[str | Outcome],
    answer: oai.Framing[Any],
    scope: Scope,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """``data:`` chunks, then ``data: [DONE]``. A failure after the 200 travels as a ``data: {"error"}`` chunk."""
    finished = False
    try:
        for chunk in answer.opening():
            yield frame(None, chunk)
        async for item in stream:
            if isinstance(item, str):
                if item:
                    yield frame(None, answer.text(item))
                continue
            finished = True
            note_outcome(scope, item)
            yield frame(None, answer.closing(item))
            if include_usage:
                yield frame(None, answer.usage(item))
        yield DONE
    except SmolLMError as exc:
        note(scope, error_type=exc.type)
        yield frame(None, oai.error_of(exc, status_of(exc)))
        yield DONE
    except (GeneratorExit, asyncio.CancelledError):
        if not finished:
            note(scope, finish_reason="cancelled")
        raise
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


# --- errors in OpenAI's shape --------------------------------------------------------------------------------------


def _error_response(status: int, body: oai.ErrorBody, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(body, status_code=status, headers=headers or {}, media_type=MediaType.JSON)


def _smollm_error(request: Request[Any, Any, Any], exc: SmolLMError) -> Response[Any]:
    note(request.scope, error_type=exc.type)
    status = status_of(exc)
    if status >= 500 and exc.type == "generation_error":
        log.error("request failed: %s", exc.message, extra={"event": "request_failed", "error_type": exc.type})
    return _error_response(status, oai.error_of(exc, status), headers_of(exc))


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    note(request.scope, error_type="invalid_request")
    message, field = describe_validation(exc)
    body = oai.error_body(HTTP_400_BAD_REQUEST, "invalid_request", message, field)
    return _error_response(HTTP_400_BAD_REQUEST, body)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    code = type_of_status(status)
    note(request.scope, error_type=code)
    message = str(exc.detail) if exc.detail else f"HTTP {status}"
    return _error_response(status, oai.error_body(status, code, message), dict(exc.headers or {}))


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, extra={"event": "unhandled_error"})
    note(request.scope, error_type="server_error")
    status = HTTP_500_INTERNAL_SERVER_ERROR
    message = "the server hit an unexpected error; it is logged, and the request can be retried"
    return _error_response(status, oai.error_body(status, "server_error", message))


router = Router(
    path="/v1",
    route_handlers=[OpenAIController],
    exception_handlers={
        SmolLMError: _smollm_error,
        ValidationException: _validation_error,
        HTTPException: _http_error,
        Exception: _unexpected_error,
    },
)
