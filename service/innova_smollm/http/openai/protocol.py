"""OpenAI-compatible wire types: requests, answers, stream chunks and errors. No I/O here.

Requests accept the fields the OpenAI SDK, LangChain and llama.cpp/vLLM scripts send and *ignore unknown ones*
(unlike the native API, which rejects them): those tools add fields such as ``user``, ``n``, ``logprobs`` or
``frequency_penalty`` whether or not the server uses them. Decisions a caller may need to know:

- ``model`` is read and ignored: one model is served, and answers name it (``GET /v1/models`` lists it).
- Omitted sampling fields take the service's defaults (temperature 0.7, top_p 0.95), as on the native API.
- ``max_completion_tokens`` wins over ``max_tokens``; omitted, the answer may use what fits, up to SMOLLM_MAX_TOKENS.
- ``finish_reason`` is ``stop`` or ``length``. The native ``timeout`` (SMOLLM_REQUEST_TIMEOUT_S ran out while
  generating) maps to ``length``: the answer was cut by a server limit, which OpenAI clients read as truncation.
  ``cancelled`` (the client went away) maps to ``stop``; no connected client ever receives it.
- ``n`` > 1 and non-text content parts are refused with a 400 rather than answered with less than was asked.
- Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; ``code`` is the native error type
  (``context_length_exceeded``, ``queue_full``, ``not_ready``...), and an over-long prompt's message starts like
  OpenAI's ("This model's maximum context length is ..."), which some tools match on to trim history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from innova_smollm.errors import ContextLengthExceededError, ServiceError
from innova_smollm.http.native.protocol import MaxTokens, Stop, Temperature, TopP

# --- requests --------------------------------------------------------------------------------------------------


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class Message(msgspec.Struct, kw_only=True):
    role: Annotated[
        Literal["system", "developer", "user", "assistant"],
        Meta(description="`developer` is read as `system`. Tool messages are not supported."),
    ]
    content: Annotated[
        str | list[ContentPart] | None,
        Meta(description="Text, or a list of `{type: text, text}` parts that are joined."),
    ] = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: Annotated[
        bool, Meta(description="Send one more chunk before `[DONE]` with empty `choices` and the usage.")
    ] = False


class Sampling(msgspec.Struct, kw_only=True):
    model: Annotated[str | None, Meta(description="Ignored: this server serves one model.")] = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: Annotated[int | None, Meta(description="Repeatable sampling; reduced modulo 2**32.")] = None
    n: Annotated[int, Meta(ge=1, description="Only 1 is supported.")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]


class CompletionRequest(Sampling, kw_only=True):
    prompt: Annotated[str | list[str], Meta(description="The text to continue; a list must hold exactly one.")]


# --- answers ---------------------------------------------------------------------------------------------------

OpenAIFinishReason = Literal["stop", "length"]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    finish_reason: OpenAIFinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    logprobs: None = None


class Completion(msgspec.Struct, kw_only=True):
    """A ``/v1/completions`` answer; streamed chunks have the same shape with the text so far."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "innova-smollm"


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


# --- errors ----------------------------------------------------------------------------------------------------

#: OpenAI's error ``type`` by HTTP status; 5xx are all ``server_error``.
_TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}

#: OpenAI's ``code`` where it has its own word for one of ours.
_CODES = {"authentication_error": "invalid_api_key"}


def error_body(status: int, code: str | None, message: str, param: str | None = None) -> ErrorBody:
    type_ = _TYPES_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=_CODES.get(code or "", code)))


def message_of(exc: ServiceError) -> str:
    if isinstance(exc, ContextLengthExceededError):
        details: Mapping[str, Any] = exc.details
        return (
            f"This model's maximum context length is {details['n_ctx']} tokens. However, you requested "
            f"{details['prompt_tokens'] + details['max_tokens']} tokens ({details['prompt_tokens']} in the "
            f"messages, {details['max_tokens']} in the completion). Please reduce the length of the messages or "
            f"completion. (At most {details['max_tokens_that_fit']} new tokens fit after this prompt.)"
        )
    return exc.message
