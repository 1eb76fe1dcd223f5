"""Native routes: ``/innova/api/smollm/*`` and the UI's token stream ``/innova/api/chatlaya/message``."""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from innova_smollm.core.service import ModelService, Prepared, State
from innova_smollm.http.auth import PUBLIC
from innova_smollm.http.native.protocol import (
    ChatRequest,
    ChatResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
)
from innova_smollm.http.native.serving import NativeWire, messages_from, options_from, service_info
from innova_smollm.http.requestlog import note
from innova_smollm.http.streaming import answer

ERROR_RESPONSES = {
    code: ResponseSpec(data_container=ErrorBody, description=text)
    for code, text in {
        400: "Invalid request: `error.field` names the field and the message the limit it broke.",
        413: "The request body is larger than SMOLLM_MAX_BODY_BYTES.",
        503: "Not ready (loading, error, disabled) or busy: retry after the `Retry-After` header's seconds.",
    }.items()
}


async def prepare_chat(request: Request[Any, Any, Any], service: ModelService, data: ChatRequest) -> Prepared:
    note(request.scope, messages=[{"role": m.role, "content": m.content} for m in data.messages])
    # Rendering the template and tokenizing a long conversation is CPU work: keep it off the event loop.
    return await anyio.to_thread.run_sync(service.prepare_chat, messages_from(data), options_from(data))


def tokenize_text(service: ModelService, data: TokenizeRequest) -> TokenizeResponse:
    tokens = service.tokenize(data.content, add_special=data.add_special, parse_special=data.parse_special)
    if not data.with_pieces:
        return TokenizeResponse(tokens=list(tokens))
    pieces: list[int | TokenPiece] = []
    for token, raw in zip(tokens, service.token_bytes(tokens), strict=True):
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        pieces.append(TokenPiece(id=token, piece=piece))
    return TokenizeResponse(tokens=pieces)


def detokenize_tokens(service: ModelService, data: DetokenizeRequest) -> DetokenizeResponse:
    return DetokenizeResponse(content=b"".join(service.token_bytes(data.tokens)).decode("utf-8", errors="replace"))


TOKENIZE_DESCRIPTION = (
    "llama.cpp's /tokenize: the model's tokens of `content`, with `add_special` (BOS) and `parse_special` "
    "(special-token text), as ids or, with `with_pieces`, as `{id, piece}`. Lets a caller count and trim history."
)
DETOKENIZE_DESCRIPTION = "llama.cpp's /detokenize: the text of a list of token ids (special tokens as their text)."


class NativeController(Controller):
    path = "/innova/api/smollm"
    tags = ["smollm"]

    @post(
        "/chat",
        summary="Chat completion with the local model",
        description="Answers a conversation with the model's chat template. `stream: true` answers as SSE: "
        '`token` events (`{"text", "index"}`, `index` naming the choice, with `logprobs` when asked), then a `done` '
        "event with usage, finish_reason and timings (and `choices` with `n` > 1).",
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
    )
    async def chat(
        self, request: Request[Any, Any, Any], data: JSONBody[ChatRequest], service: NamedDependency[ModelService]
    ) -> ChatResponse | Response[Any]:
        prepared = await prepare_chat(request, service, data)
        result: ChatResponse | Response[Any] = await answer(
            request, service, prepared, NativeWire(service, chat=True), stream=data.stream
        )
        return result

    @post(
        "/generate",
        summary="Raw text completion (no chat template)",
        description="Continues `prompt` as plain text. `stream: true` answers as SSE like /chat.",
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
    )
    async def generate(
        self, request: Request[Any, Any, Any], data: JSONBody[GenerateRequest], service: NamedDependency[ModelService]
    ) -> GenerateResponse | Response[Any]:
        note(request.scope, prompt=data.prompt)
        prepared = await anyio.to_thread.run_sync(service.prepare_generate, data.prompt, options_from(data))
        result: GenerateResponse | Response[Any] = await answer(
            request, service, prepared, NativeWire(service, chat=False), stream=data.stream
        )
        return result

    @get("/info", summary="Model and service metadata", sync_to_thread=False)
    def info(self, service: NamedDependency[ModelService]) -> Info:
        return service_info(service)

    @get("/health", summary="Readiness: 200 once the model serves, 503 otherwise", sync_to_thread=False, opt=PUBLIC)
    def health_get(self, service: NamedDependency[ModelService]) -> Response[Health]:
        return health_response(service)

    @post(
        "/health",
        summary="Readiness (POST form, as in the original backend)",
        status_code=HTTP_200_OK,
        sync_to_thread=False,
        opt=PUBLIC,
    )
    def health_post(self, service: NamedDependency[ModelService]) -> Response[Health]:
        return health_response(service)


class ChatlayaController(Controller):
    path = "/innova/api/chatlaya"
    tags = ["chatlaya"]

    @post(
        "/message",
        summary="Streaming chat for the UI (always SSE)",
        description="Same body as /innova/api/smollm/chat; always answers as Server-Sent Events: `token` events "
        '(`{"text", "index"}`), then `done` with usage and finish_reason, or `error`.',
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
    )
    async def message(
        self, request: Request[Any, Any, Any], data: JSONBody[ChatRequest], service: NamedDependency[ModelService]
    ) -> Response[Any]:
        prepared = await prepare_chat(request, service, data)
        result: Response[Any] = await answer(request, service, prepared, NativeWire(service, chat=True), stream=True)
        return result


def health_response(service: ModelService) -> Response[Health]:
    state = service.state
    if state is State.OK:
        return Response(Health(status="ok"), status_code=HTTP_200_OK)
    headers = {"Retry-After": "5"} if state is State.LOADING else {}
    return Response(
        Health(status=state.value, detail=service.detail),  # type: ignore[arg-type]
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
        headers=headers,
    )


#: The token endpoints answer at the native prefix and at llama.cpp's own paths, one handler each.
TOKENIZE_PATHS = ["/innova/api/smollm/tokenize", "/tokenize"]
DETOKENIZE_PATHS = ["/innova/api/smollm/detokenize", "/detokenize"]


@post(
    TOKENIZE_PATHS,
    summary="Tokenize text",
    description=TOKENIZE_DESCRIPTION,
    status_code=HTTP_200_OK,
    responses=ERROR_RESPONSES,
    tags=["tokens"],
)
async def tokenize(data: JSONBody[TokenizeRequest], service: NamedDependency[ModelService]) -> TokenizeResponse:
    return await anyio.to_thread.run_sync(tokenize_text, service, data)


@post(
    DETOKENIZE_PATHS,
    summary="Token ids to text",
    description=DETOKENIZE_DESCRIPTION,
    status_code=HTTP_200_OK,
    responses=ERROR_RESPONSES,
    tags=["tokens"],
)
async def detokenize(data: JSONBody[DetokenizeRequest], service: NamedDependency[ModelService]) -> DetokenizeResponse:
    return await anyio.to_thread.run_sync(detokenize_tokens, service, data)
