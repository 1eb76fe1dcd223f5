"""Wire types of the native API (``/innova/api/smollm/*`` and ``/innova/api/chatlaya/message``).

Field constraints live in the shared ``Annotated`` aliases below, so validation and the OpenAPI text come from one
place. Native requests reject unknown fields: a typo such as ``max_token`` gets a 400 naming it instead of being
silently ignored. Limits that depend on settings (message count, max_tokens cap, context) are checked in the service.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Role = Annotated[
    Literal["system", "user", "assistant"],
    Meta(description="Who wrote the message: `system` instructions, the `user`, or an earlier `assistant` answer."),
]
Content = Annotated[str, Meta(max_length=200_000, description="The message text.")]
MaxTokens = Annotated[
    int,
    Meta(
        ge=1,
        description="Most tokens to generate. Omitted: as many as fit, up to the server cap (SMOLLM_MAX_TOKENS). "
        "Above the cap, or beyond the context window together with the prompt: 400.",
    ),
]
Temperature = Annotated[
    float, Meta(ge=0.0, le=2.0, description="Sampling temperature; 0 picks the most likely token (greedy).")
]
TopP = Annotated[float, Meta(gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set of this mass.")]
TopK = Annotated[int, Meta(ge=0, le=1000, description="Keep only the K most likely tokens (0: no limit).")]
Seed = Annotated[
    int, Meta(ge=0, le=2**32 - 1, description="Fixes the random draw so the same request gives the same answer.")
]
MinP = Annotated[
    float, Meta(ge=0.0, le=1.0, description="Drop tokens less likely than this fraction of the most likely one.")
]
RepeatPenalty = Annotated[
    float, Meta(gt=0.0, le=10.0, description="llama.cpp's repeat penalty over the last 64 tokens (1.0: off).")
]
FrequencyPenalty = Annotated[
    float, Meta(ge=-2.0, le=2.0, description="Lowers a token's logit by this much per time it already appeared.")
]
PresencePenalty = Annotated[
    float, Meta(ge=-2.0, le=2.0, description="Lowers a token's logit by this much once it has appeared at all.")
]
LogitBias = Annotated[
    dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]],
    Meta(
        description="Token id (as a string, as OpenAI sends it) to a bias added to its logit, -100 to 100; -100 "
        "in effect bans the token. Ids outside the vocabulary: 400."
    ),
]
Grammar = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200_000,
        description="A GBNF grammar (llama.cpp's syntax, start rule `root`) the answer must follow. Invalid: 400.",
    ),
]


class JSONSchemaFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=64, description="The schema's name (metadata).")] | None = None
    description: Annotated[str | None, Meta(description="What the schema is for (metadata).")] = None
    schema: Annotated[
        dict[str, Any] | None,
        Meta(description="The JSON schema the answer must validate against; omitted: any JSON object."),
    ] = None
    strict: Annotated[
        bool | None,
        Meta(description="Accepted either way: the answer is always constrained to the schema, token by token."),
    ] = None


class ResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Annotated[
        str,
        Meta(description="`text` (free text), `json_object` (any JSON object) or `json_schema`. Any other: 400."),
    ]
    json_schema: JSONSchemaFormat | None = None
    schema: Annotated[
        dict[str, Any] | None,
        Meta(description='llama-cpp-python\'s shape: `{"type": "json_object", "schema": {...}}`.'),
    ] = None


StopList = Annotated[
    list[Annotated[str, Meta(min_length=1, max_length=200)]],
    Meta(description="Strings that end the answer when generated; they are not included in it."),
]
Stop = Annotated[str | StopList, Meta(description="One stop string or a list of them.")]
Stream = Annotated[bool, Meta(description="Answer as Server-Sent Events, one `token` event per chunk then `done`.")]


class ChatMessageIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Role
    content: Content


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 0.7
    top_p: TopP = 0.95
    top_k: TopK = 40
    min_p: MinP = 0.05
    repeat_penalty: RepeatPenalty = 1.0
    frequency_penalty: FrequencyPenalty = 0.0
    presence_penalty: PresencePenalty = 0.0
    logit_bias: LogitBias | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: Stream = False
    response_format: Annotated[
        ResponseFormat | None,
        Meta(description="Constrain the answer to JSON (`json_object`) or to a JSON schema (`json_schema`)."),
    ] = None
    grammar: Grammar | None = None
    logprobs: (
        Annotated[
            int,
            Meta(
                ge=0,
                le=20,
                description="Return each answer token's log probability (the model's raw distribution) with this many "
                "most likely alternatives.",
            ),
        ]
        | None
    ) = None
    n: Annotated[
        int,
        Meta(
            ge=1,
            description="How many answers to generate for the prompt, at most SMOLLM_PARALLEL (above: 400). The prompt "
            "is decoded once; each answer samples on its own (with `seed`, answer i uses seed + i). Above 1 the answer "
            "has `choices`, and stream events carry the choice's `index`.",
        ),
    ] = 1


class ChatRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[
        list[ChatMessageIn],
        Meta(min_length=1, description="The conversation so far, oldest first; the answer continues it."),
    ]


class GenerateRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[
        str,
        Meta(min_length=1, max_length=1_000_000, description="Raw text to continue; no chat template is applied."),
    ]


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """llama.cpp's ``/tokenize`` body."""

    content: Annotated[str, Meta(max_length=1_000_000, description="The text to tokenize.")]
    add_special: Annotated[
        bool, Meta(description="Add the model's begin-of-sequence token, as a raw-text prompt gets it.")
    ] = False
    parse_special: Annotated[
        bool, Meta(description="Read special-token text such as `<|im_start|>` as the special token.")
    ] = True
    with_pieces: Annotated[bool, Meta(description='Answer `{"id", "piece"}` per token instead of ids.')] = False


class TokenPiece(msgspec.Struct, kw_only=True):
    id: int
    piece: Annotated[str | list[int], Meta(description="The token's text, or its bytes when they are not whole UTF-8.")]


class TokenizeResponse(msgspec.Struct, kw_only=True):
    tokens: list[int | TokenPiece]


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """llama.cpp's ``/detokenize`` body."""

    tokens: Annotated[list[int], Meta(max_length=1_000_000, description="Token ids; outside the vocabulary: 400.")]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    content: Annotated[str, Meta(description="The tokens' text; bytes that are not whole UTF-8 become U+FFFD.")]


class ModelInfo(msgspec.Struct, kw_only=True):
    model_name: Annotated[str, Meta(description="The GGUF file's stem, e.g. Llama-3.2-3B-Instruct-Q4_K_M.")]
    device: Annotated[str, Meta(description="`cpu`, or `gpu` when layers are offloaded; `none` for echo.")]
    parameters: Annotated[int, Meta(description="The model's real parameter count, read from llama.cpp.")]
    provider: Annotated[
        str, Meta(description="`local` (the model), `echo` (PROVIDER=echo) or `echo-fallback` (SMOLLM_FALLBACK).")
    ]
    quantization: Annotated[str, Meta(description="Weight type of the GGUF file, e.g. Q4_K_M.")]
    n_ctx: Annotated[int, Meta(description="Context window in tokens (prompt + answer).")]
    fallback_reason: Annotated[
        str | None, Meta(description="Why the fallback answered instead of the model; null otherwise.")
    ] = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(msgspec.Struct, kw_only=True):
    queue_ms: Annotated[float, Meta(description="Time spent waiting for the engine.")]
    first_token_ms: Annotated[float | None, Meta(description="From arrival to the first answer text.")]
    total_ms: Annotated[float, Meta(description="From arrival to the last token.")]
    tokens_per_second: Annotated[float | None, Meta(description="Decode speed after the first token.")]


FinishReasonField = Annotated[
    Literal["stop", "length", "cancelled", "timeout"],
    Meta(
        description="`stop`: end of answer or a stop string; `length`: max_tokens reached; "
        "`timeout`: SMOLLM_REQUEST_TIMEOUT_S ran out; `cancelled`: the client went away."
    ),
]


class TopToken(msgspec.Struct, kw_only=True):
    token: str
    logprob: float


class TokenLogprobs(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    top_logprobs: list[TopToken]


LogprobsField = Annotated[
    list[TokenLogprobs] | None, Meta(description="One per answer token when `logprobs` was asked for; else null.")
]


class Choice(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One of the answers of a request with `n` > 1."""

    index: int
    text: Annotated[str | None, Meta(description="The answer (absent in a stream's `done`: it was streamed).")] = None
    finish_reason: FinishReasonField
    completion_tokens: int
    logprobs: LogprobsField = None


ChoicesField = Annotated[
    list[Choice] | msgspec.UnsetType,
    Meta(description="With `n` > 1, every answer by index; the top-level answer and finish_reason are choice 0's."),
]


class ChatResponse(msgspec.Struct, kw_only=True):
    response: Annotated[str, Meta(description="The assistant's answer (the first choice's with `n` > 1).")]
    model_info: ModelInfo
    usage: Annotated[Usage, Meta(description="The prompt's tokens once, and all choices' answer tokens.")]
    finish_reason: FinishReasonField
    timings: Timings
    logprobs: LogprobsField = None
    choices: ChoicesField = msgspec.UNSET


class GenerateResponse(msgspec.Struct, kw_only=True):
    text: Annotated[str, Meta(description="The generated continuation of the prompt (the first choice's).")]
    model_info: ModelInfo
    usage: Usage
    finish_reason: FinishReasonField
    timings: Timings
    logprobs: LogprobsField = None
    choices: ChoicesField = msgspec.UNSET


class StreamToken(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Data of a `token` event of a native stream."""

    text: str
    index: Annotated[int, Meta(description="The choice this text belongs to (0 unless `n` > 1).")]
    logprobs: Annotated[
        list[TokenLogprobs] | None,
        Meta(description="With `logprobs`: those of exactly the tokens whose text this event carries."),
    ] = None


class StreamDone(msgspec.Struct, kw_only=True):
    """Data of the final `done` event of a native stream."""

    finish_reason: FinishReasonField
    usage: Usage
    model_info: ModelInfo
    timings: Timings
    logprobs: LogprobsField = None
    choices: ChoicesField = msgspec.UNSET


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: Annotated[
        Literal["ok", "loading", "error", "disabled", "stopping"],
        Meta(description="`ok` once the model is loaded and serving; anything else comes with HTTP 503."),
    ]
    detail: Annotated[str | None, Meta(description="Why the model is not serving, for an operator to read.")] = None


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: Annotated[str, Meta(description="Stable error code, e.g. invalid_request, context_length_exceeded.")]
    message: Annotated[str, Meta(description="What went wrong and what to change, in words.")]
    field: Annotated[str | None, Meta(description="The request field at fault, when there is one.")] = None
    details: dict[str, Any] | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class Info(msgspec.Struct, kw_only=True):
    state: Annotated[str, Meta(description="ok, loading, error, disabled or stopping (as on /health).")]
    detail: str | None
    provider: Annotated[str, Meta(description="PROVIDER: local or echo.")]
    fallback: Annotated[str, Meta(description="SMOLLM_FALLBACK: none or echo.")]
    model_path: Annotated[str, Meta(description="Resolved SMOLLM_MODEL_PATH.")]
    model_name: str
    architecture: str | None
    parameters: Annotated[int | None, Meta(description="Real parameter count from llama.cpp; null until loaded.")]
    file_size_bytes: int | None
    quantization: str | None
    n_ctx: int
    n_ctx_train: Annotated[int | None, Meta(description="Context length the model was trained with.")]
    n_threads: Annotated[int, Meta(description="SMOLLM_N_THREADS: decode threads configured.")]
    decode_threads: Annotated[
        int | None,
        Meta(
            description="Decode threads in use now: fewer than n_threads while CPU contention makes that faster "
            "(SMOLLM_ADAPTIVE_THREADS). Null until loaded."
        ),
    ]
    n_gpu_layers: int
    device: str
    has_chat_template: Annotated[bool | None, Meta(description="Whether the GGUF carries its own chat template.")]
    chat_template_source: Annotated[str | None, Meta(description="`gguf`, or `fallback:chatml` when it has none.")]
    vocab_size: int | None
    llama_cpp_python_version: str | None
    load_time_s: float | None
    flash_attn: Annotated[bool | None, Meta(description="Whether llama.cpp uses flash attention (SMOLLM_FLASH_ATTN).")]
    parallel: Annotated[int, Meta(description="SMOLLM_PARALLEL: sequences decoded together.")]
    kv_layout: Annotated[
        str,
        Meta(
            description="The KV layout in use (SMOLLM_KV_LAYOUT, `auto` resolved once the model is loaded): `shared` "
            "(one KV cache of n_ctx cells for all sequences) or `per_sequence` (n_ctx cells for each); applies when "
            "parallel is above 1."
        ),
    ]
    step_tokens: Annotated[
        int | None,
        Meta(description="Tokens per llama.cpp decode call: 128 for models of 1B parameters and more, else 512."),
    ]
    max_queue: Annotated[int, Meta(description="SMOLLM_MAX_QUEUE: requests allowed to wait.")]
    max_tokens: Annotated[int, Meta(description="SMOLLM_MAX_TOKENS: server cap on max_tokens.")]
    in_flight: Annotated[
        int, Meta(description="Places taken by requests running or waiting (a request with `n` choices takes n).")
    ]
    deployment: Annotated[
        dict[str, Any] | None,
        Meta(description="The deployed models (current, previous: name, sha256, when) from SMOLLM_MODEL_MANIFEST."),
    ] = None
