"""OpenAI-compatible wire types: requests, answers, stream chunks and errors. No I/O here.

Nothing a request asks for is silently ignored. Every field OpenAI defines is declared below, in one of three groups:

- **Honoured**: ``messages``/``prompt``, ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``,
  ``stop``, ``seed``, ``n`` (up to SMOLLM_PARALLEL), ``stream``, ``stream_options.include_usage``,
  ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``response_format`` (``text``, ``json_object``,
  ``json_schema``), and the extensions llama.cpp's server, vLLM and llama-cpp-python take: ``top_k``, ``min_p``,
  ``repeat_penalty``.
- **Metadata, read and ignored**: ``model`` (one model is served, and answers name it), ``user``, ``metadata``,
  ``store`` (nothing is stored), ``service_tier``, ``prompt_cache_key`` (the prompt cache is automatic),
  ``safety_identifier``; in messages ``name``, ``annotations`` and a null ``refusal``/``audio``/``function_call``.
  They change nothing in the answer. ``parallel_tool_calls`` is accepted either way: an answer makes one call.
- **Tools**: ``tools``, ``tool_choice`` (``none``, ``auto``, ``required``, a named function), assistant messages with
  ``tool_calls`` and ``role: "tool"`` messages: see :mod:`innova_smollm.http.openai.tools`.
- **Refused with a 400 naming the field** when they ask for something (a null, ``false`` or default value is fine):
  the legacy ``functions``/``function_call``, ``n`` above SMOLLM_PARALLEL or together with ``tools``, ``audio``,
  ``modalities`` other than ``["text"]``, ``prediction``, ``reasoning_effort``, ``verbosity``,
  ``web_search_options``; on ``/v1/completions`` also ``echo``, ``best_of`` > 1 and ``suffix``; a ``response_format``
  type other than the three above; a JSON schema construct the grammar cannot enforce (see
  :mod:`innova_smollm.core.schema`); ``stop`` together with ``response_format``. **Any other field is a 400 too**
  (``param`` names it), so a typo or a feature this server lacks never silently means something else.

Other decisions a caller may need to know:

- Omitted sampling fields take the service's defaults (temperature 0.7, top_p 0.95, top_k 40, min_p 0.05).
- ``max_completion_tokens`` wins over ``max_tokens``; omitted, the answer may use what fits, up to SMOLLM_MAX_TOKENS.
- ``response_format`` constrains the text token by token (llguidance, see engine.grammar): an answer that ends with
  ``finish_reason: "stop"`` always parses (and validates against the schema); one cut by ``max_tokens`` says
  ``length``. ``json_schema.strict`` is accepted either way: the schema is always enforced.
- ``finish_reason`` is ``stop`` or ``length``. The native ``timeout`` (SMOLLM_REQUEST_TIMEOUT_S ran out while
  generating) maps to ``length``: the answer was cut by a server limit, which OpenAI clients read as truncation.
  ``cancelled`` (the client went away) maps to ``stop``; no connected client ever receives it.
- ``logprobs`` (chat: ``logprobs: true`` + ``top_logprobs`` up to 20; completions: ``logprobs`` up to 5) are the
  model's raw distribution at each step (before temperature, penalties, biases and grammar). A streamed answer
  carries each token's in the chunk that carries its text, as OpenAI does; a token whose text never came (cut by
  a stop string) rides on the choice's last chunk, the one with ``finish_reason``.
- ``n`` answers decode side by side from one prompt, decoded once (its KV cells are copied, not recomputed); each
  samples on its own, and with ``seed`` choice ``i`` uses ``seed + i``, so the set repeats. Greedy choices are
  identical. ``usage`` counts the prompt once and every choice's answer tokens. A request with ``n`` choices takes
  ``n`` of SMOLLM_PARALLEL's sequences and counts ``n`` times against SMOLLM_PARALLEL + SMOLLM_MAX_QUEUE; in the
  ``shared`` KV layout the choices also share its n_ctx cells (the prompt once, each answer's ``max_tokens``).
  Streamed chunks carry each choice's ``index``.
- Non-text content parts are refused with a 400 rather than answered with less than was asked.
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
from innova_smollm.http.native.protocol import (
    FrequencyPenalty,
    LogitBias,
    MaxTokens,
    MinP,
    PresencePenalty,
    RepeatPenalty,
    ResponseFormat,
    Stop,
    Temperature,
    TopK,
    TopP,
)

#: Fields that are only metadata: read and ignored (see the module docstring).
Ignored = Annotated[Any, Meta(description="Metadata: accepted and ignored.")]
#: Fields that ask for something this server does not do: any value but null (or the default) is a 400.
Refused = Annotated[Any, Meta(description="Not supported: any value but null (or the default) is a 400.")]

# --- requests --------------------------------------------------------------------------------------------------


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None
    image_url: Refused = None
    input_audio: Refused = None
    file: Refused = None


class FunctionCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    arguments: Annotated[str, Meta(description="The arguments as a JSON string.")]


class ToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: Annotated[
        dict[str, Any] | None, Meta(description="JSON schema of the arguments; omitted: no arguments.")
    ] = None
    strict: Annotated[bool | None, Meta(description="Accepted either way (see tool_choice).")] = None


class Tool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: NamedFunction


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Annotated[
        Literal["system", "developer", "user", "assistant", "tool"],
        Meta(description="`developer` is read as `system`; `tool` carries a tool's result (with tool_call_id)."),
    ]
    content: Annotated[
        str | list[ContentPart] | None,
        Meta(description="Text, or a list of `{type: text, text}` parts that are joined."),
    ] = None
    name: Ignored = None
    annotations: Ignored = None
    refusal: Refused = None
    audio: Refused = None
    function_call: Refused = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: Annotated[
        bool, Meta(description="Send one more chunk before `[DONE]` with empty `choices` and the usage.")
    ] = False


class Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str | None, Meta(description="Ignored: this server serves one model.")] = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    presence_penalty: PresencePenalty | None = None
    logit_bias: LogitBias | None = None
    stop: Stop | None = None
    seed: Annotated[int | None, Meta(description="Repeatable sampling; reduced modulo 2**32.")] = None
    n: (
        Annotated[
            int,
            Meta(ge=1, description="Answers for the prompt, up to SMOLLM_PARALLEL; with seed, choice i uses seed + i."),
        ]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: Ignored = None
    metadata: Ignored = None
    store: Ignored = None
    service_tier: Ignored = None
    prompt_cache_key: Ignored = None
    safety_identifier: Ignored = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    parallel_tool_calls: Annotated[
        bool | None, Meta(description="Accepted: an answer makes at most one call, which either value allows.")
    ] = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: Refused = None
    function_call: Refused = None
    logprobs: Annotated[bool | None, Meta(description="Return each answer token's log probability.")] = None
    top_logprobs: (
        Annotated[
            int, Meta(ge=0, le=20, description="With logprobs: the most likely tokens at each position, up to 20.")
        ]
        | None
    ) = None
    audio: Refused = None
    modalities: Refused = None
    prediction: Refused = None
    reasoning_effort: Refused = None
    verbosity: Refused = None
    web_search_options: Refused = None


class CompletionRequest(Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str | list[str], Meta(description="The text to continue; a list must hold exactly one.")]
    logprobs: (
        Annotated[
            int, Meta(ge=0, le=5, description="Each token's log probability and the most likely tokens, up to 5.")
        ]
        | None
    ) = None
    echo: Refused = None
    best_of: Refused = None
    suffix: Refused = None


# --- answers ---------------------------------------------------------------------------------------------------

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int  # no default, so always sent: clients merge the deltas of one call by it
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    finish_reason: OpenAIFinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    logprobs: CompletionLogprobs | None = None


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
