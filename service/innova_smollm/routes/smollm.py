"""Native routes: ``/innova/api/smollm/*`` and the UI's token stream ``/innova/api/chatlaya/message``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import Scope

from innova_smollm.answers import model_info_of, service_info, timings_of, usage_of
from innova_smollm.auth import PUBLIC
from innova_smollm.disconnect import unless_disconnected
from innova_smollm.errors import SmolLMError
from innova_smollm.generation import ChatMessage
from innova_smollm.http_errors import error_body
from innova_smollm.requestlog import note, note_outcome
from innova_smollm.schemas import (
    ChatRequest,
    ChatResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    SamplingFields,
    StreamDone,
)
from innova_smollm.service import Outcome, Prepared, RequestOptions, SmolLMService, State
from innova_smollm.socket_writer import direct_text_for
from innova_smollm.sse import frame, sse_response

#: Sent when a client went away before its answer was ready; nobody reads it (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499

ERROR_RESPONSES = {
    code: ResponseSpec(data_container=ErrorBody, description=text)
    for code, text in {
        400: "Invalid request: `error.field` names the field and the message the limit it broke.",
        413: "The request body is larger than SMOLLM_MAX_BODY_BYTES.",
        503: "Not ready (loading, error, disabled) or busy: retry after the `Retry-After` header's seconds.",
    }.items()
}


def options_from(data: SamplingFields) -> RequestOptions:
    stop = data.stop if isinstance(data.stop, list) else [data.stop] if data.stop else []
    return RequestOptions(
        max_tokens=data.max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        stop=tuple(stop),
        seed=data.seed,
    )


def messages_from(data: ChatRequest) -> list[ChatMessage]:
    return [ChatMessage(role=m.role, content=m.content) for m in data.messages]


async def collect(stream: AsyncIterator[str | Outcome]) -> Outcome:
    async for item in stream:
        if isinstance(item, Outcome):
            return item
    raise RuntimeError("the answer stream ended without an outcome")  # pragma: no cover - service invariant


def token_frame(text: str) -> bytes:
    return frame("token", {"text": text})


async def native_events(
    service: SmolLMService, stream: AsyncIterator[str | Outcome], scope: Scope
) -> AsyncIterator[bytes]:
    """``token`` events with text chunks, then one ``done`` event; an ``error`` event if generation fails."""
    finished = False
    try:
        async for item in stream:
            if isinstance(item, str):
                if item:
                    yield token_frame(item)
            else:
                finished = True
                note_outcome(scope, item)
                done = StreamDone(
                    finish_reason=item.finish_reason.value,
                    usage=usage_of(item),
                    model_info=model_info_of(service, item),
                    timings=timings_of(item),
                )
                yield frame("done", done)
    except SmolLMError as exc:
        # Headers (200) are already sent; the error travels as the stream's last event.
        note(scope, error_type=exc.type)
        yield frame("error", error_body(exc.type, exc.message))
    except (GeneratorExit, asyncio.CancelledError):
        if not finished:
            note(scope, finish_reason="cancelled")
        raise
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def prepare_chat(request: Request[Any, Any, Any], service: SmolLMService, data: ChatRequest) -> Prepared:
    note(request.scope, messages=[{"role": m.role, "content": m.content} for m in data.messages])
    # Rendering the template and tokenizing a long conversation is CPU work: keep it off the event loop.
    return await anyio.to_thread.run_sync(service.prepare_chat, messages_from(data), options_from(data))


async def answer(
    request: Request[Any, Any, Any], service: SmolLMService, prepared: Prepared, stream_requested: bool
) -> Outcome | Response[Any]:
    if stream_requested:
        # The engine thread writes the tokens to the socket itself when the server allows it (socket_writer).
        open_direct = direct_text_for(request.scope, token_frame)
        stream = service.open_stream(prepared, open_direct=open_direct)
        return sse_response(native_events(service, stream, request.scope))
    stream = service.open_stream(prepared, live_text=False)
    outcome = await unless_disconnected(request.receive, lambda: collect(stream))
    if outcome is None:
        note(request.scope, finish_reason="cancelled")
        return Response(error_body("cancelled", "the client disconnected"), status_code=CLIENT_CLOSED_REQUEST)
    note_outcome(request.scope, outcome)
    return outcome


class SmolLMController(Controller):
    path = "/innova/api/smollm"
    tags = ["smollm"]

    @post(
        "/chat",
        summary="Chat completion with the local model",
        description="Answers a conversation with the model's chat template. `stream: true` answers as SSE: "
        '`token` events (`{"text"}`), then a `done` event with usage, finish_reason and timings.',
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
    )
    async def chat(
        self, request: Request[Any, Any, Any], data: JSONBody[ChatRequest], service: NamedDependency[SmolLMService]
    ) -> ChatResponse | Response[Any]:
        prepared = await prepare_chat(request, service, data)
        result = await answer(request, service, prepared, data.stream)
        if not isinstance(result, Outcome):
            return result
        return ChatResponse(
            response=result.text,
            model_info=model_info_of(service, result),
            usage=usage_of(result),
            finish_reason=result.finish_reason.value,
            timings=timings_of(result),
        )

    @post(
        "/generate",
        summary="Raw text completion (no chat template)",
        description="Continues `prompt` as plain text. `stream: true` answers as SSE like /chat.",
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
    )
    async def generate(
        self, request: Request[Any, Any, Any], data: JSONBody[GenerateRequest], service: NamedDependency[SmolLMService]
    ) -> GenerateResponse | Response[Any]:
        note(request.scope, prompt=data.prompt)
        prepared = await anyio.to_thread.run_sync(service.prepare_generate, data.prompt, options_from(data))
        result = await answer(request, service, prepared, data.stream)
        if not isinstance(result, Outcome):
            return result
        return GenerateResponse(
            text=result.text,
            model_info=model_info_of(service, result),
            usage=usage_of(result),
            finish_reason=result.finish_reason.value,
            timings=timings_of(result),
        )

    @get("/info", summary="Model and service metadata", sync_to_thread=False)
    def info(self, service: NamedDependency[SmolLMService]) -> Info:
        return service_info(service)

    @get("/health", summary="Readiness: 200 once the model serves, 503 otherwise", sync_to_thread=False, opt=PUBLIC)
    def health_get(self, service: NamedDependency[SmolLMService]) -> Response[Health]:
        return health_response(service)

    @post(
        "/health",
        summary="Readiness (POST form, as in the original backend)",
        status_code=HTTP_200_OK,
        sync_to_thread=False,
        opt=PUBLIC,
    )
    def health_post(self, service: NamedDependency[SmolLMService]) -> Response[Health]:
        return health_response(service)


class ChatlayaController(Controller):
    path = "/innova/api/chatlaya"
    tags = ["chatlaya"]

    @post(
        "/message",
        summary="Streaming chat for the UI (always SSE)",
        description="Same body as /innova/api/smollm/chat; always answers as Server-Sent Events: `token` events "
        '(`{"text"}`), then `done` with usage and finish_reason, or `error`.',
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
    )
    async def message(
        self, request: Request[Any, Any, Any], data: JSONBody[ChatRequest], service: NamedDependency[SmolLMService]
    ) -> Response[Any]:
        prepared = await prepare_chat(request, service, data)
        result = await answer(request, service, prepared, stream_requested=True)
        assert isinstance(result, Response)
        return result


def health_response(service: SmolLMService) -> Response[Health]:
    state = service.state
    if state is State.OK:
        return Response(Health(status="ok"), status_code=HTTP_200_OK)
    headers = {"Retry-After": "5"} if state is State.LOADING else {}
    return Response(
        Health(status=state.value, detail=service.detail),  # type: ignore[arg-type]
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
        headers=headers,
    )
