"""What flows between the service layer and an engine: jobs in, text chunks out.

An engine owns one llama.cpp context and the single thread that touches it. Callers hand it a
:class:`GenerationJob` with a :class:`TokenSink`; the engine thread calls the sink as tokens come and checks
``sink.cancelled()`` between tokens, so a caller that goes away stops its generation within a token or two.
This module is pure: no llama_cpp, no litestar.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class FinishReason(StrEnum):
    STOP = "stop"  #: end of sequence token or a stop string
    LENGTH = "length"  #: max_tokens reached
    CANCELLED = "cancelled"  #: the caller went away
    TIMEOUT = "timeout"  #: SMOLLM_REQUEST_TIMEOUT_S ran out during generation


@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    """One answer token's log probability under the model (its raw distribution: before temperature, penalties,
    biases and grammar), and the most likely tokens at that position with theirs."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True, kw_only=True)
class TemplateToolCall:
    """An earlier tool call of an assistant turn, for a chat template that renders tool calls itself."""

    id: str
    name: str
    #: The arguments as the caller sent them, a JSON string (OpenAI's shape).
    arguments: str


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    role: str
    content: str
    #: An assistant turn's tool calls; only a chat template that knows tools gets them (see ``template_form``).
    tool_calls: tuple[TemplateToolCall, ...] = ()
    #: A ``tool`` turn's answer to which call.
    tool_call_id: str | None = None

    def template_form(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates take it (and llama.cpp hands it to them).

        ``tool_calls`` are ``{"id", "type": "function", "function": {"name", "arguments"}}`` with ``arguments`` a
        JSON object, not a string: templates write them with ``tojson`` (Llama 3.2's does). A tool result that is a
        JSON object or array is passed parsed for the same reason (the template ``tojson``-s a mapping or a list);
        any other tool result is passed as the string it is.
        """
        form: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            form["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _json_or_text(call.arguments, object_only=True)},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            form["tool_call_id"] = self.tool_call_id
        if self.role == "tool":
            form["content"] = _json_or_text(self.content, object_only=False)
        return form


def _json_or_text(text: str, *, object_only: bool) -> Any:
    """``text`` parsed when it is a JSON object (or array, unless ``object_only``), else ``text`` itself."""
    if not text.lstrip().startswith(("{",) if object_only else ("{", "[")):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (dict, list)) else text


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    #: llama.cpp's penalties over the last tokens: multiplicative (1.0: off), and OpenAI's additive ones (0.0: off).
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: (token id, bias added to its logit), as OpenAI's ``logit_bias``.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: None draws a fresh seed per request; a fixed seed makes a sampled answer repeatable.
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the engine takes the argmax in place, without a chain."""
        return self.greedy and not self.penalised and not self.logit_bias


_job_ids = itertools.count(1)


@dataclass(frozen=True, kw_only=True)
class GenerationJob:
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    #: None: no log probabilities; k: each answer token's, with the k most likely alternatives (TokenLogprob).
    logprobs: int | None = None
    #: The engine's grammar (from Engine.json_schema_grammar or gbnf_grammar) the answer must follow token by token,
    #: already checked; None: free text.
    grammar: str | None = None
    #: How many answers (choices) to the one prompt: the prompt is decoded once and its KV cells are shared by the
    #: choices, each sampling on its own (with ``seed + index`` when the sampling has a seed).
    n: int = 1
    #: time.monotonic() after which generation stops with FinishReason.TIMEOUT.
    deadline: float = float("inf")
    job_id: int = field(default_factory=lambda: next(_job_ids))


@dataclass(frozen=True)
class JobFinish:
    """How a job ended, kept by the engine even when nobody was listening any more (diagnostics and tests)."""

    job_id: int
    reason: FinishReason
    completion_tokens: int


class TokenSink(Protocol):
    """Receives one job's output. Every method is called from the engine thread, so each must return quickly.

    A job with ``n`` choices has one sink: ``text`` and ``finished`` name the choice (0 to n - 1), and the job is over
    once every choice has finished (or the job failed).
    """

    def cancelled(self) -> bool:
        """True once the caller no longer wants the output; the engine then stops this job."""
        ...

    def started(self) -> None:
        """The job left the queue and its prompt is being processed."""
        ...

    def text(self, chunk: str, logprobs: Sequence[TokenLogprob] | None = None, choice: int = 0) -> None:
        """A piece of the answer, already cut at stop strings and at whole UTF-8 characters. ``logprobs`` (when the
        job asked for them): those of exactly the tokens whose text this piece completes (see
        :class:`innova_smollm.engine.detokenize.LogprobQueue`)."""
        ...

    def finished(
        self,
        reason: FinishReason,
        completion_tokens: int,
        logprobs: Sequence[TokenLogprob] | None = None,
        choice: int = 0,
    ) -> None:
        """The choice ended; no call for it follows. ``logprobs``: all of its answer tokens' when the job asked."""
        ...

    def failed(self, error: Exception) -> None:
        """The engine could not run the job; no call follows."""
        ...


@dataclass(frozen=True, kw_only=True)
class PromptCacheStats:
    """What the prompt cache spared since start (/metrics): prompt tokens taken from it and decoded, and the KV
    states saved to and restored from host memory, with the bytes held now."""

    tokens_reused: int
    tokens_decoded: int
    states_saved: int
    states_restored: int
    saved_bytes: int


@dataclass(frozen=True, kw_only=True)
class ModelMetadata:
    name: str
    path: str
    architecture: str
    parameters: int
    file_size_bytes: int
    quantization: str
    n_ctx: int
    n_ctx_train: int
    n_threads: int
    n_gpu_layers: int
    device: str
    has_chat_template: bool
    chat_template_source: str
    vocab_size: int
    llama_cpp_python_version: str
    load_time_s: float
    parallel: int
    flash_attn: bool
    #: The KV layout in use: SMOLLM_KV_LAYOUT with ``auto`` resolved by the engine.
    kv_layout: str
    #: Tokens per llama_decode call, by the model's size (engine/step_size.py).
    step_tokens: int


class DecodeThreads(Protocol):
    """What the engine tells of its decode threads (/metrics): the engine's thread governor answers it."""

    def settled(self) -> int:
        """Threads decoding now, outside a probe."""
        ...

    def moves(self) -> dict[str, int]:
        """How often the count moved down and up since start, by direction."""
        ...


class Engine(Protocol):
    """One loaded model. ``submit`` is thread-safe and never blocks; the rest is read-only after load."""

    @property
    def metadata(self) -> ModelMetadata: ...

    @property
    def threads(self) -> DecodeThreads:
        """How many threads decode right now, and how often CPU contention changed that."""
        ...

    def prompt_cache(self) -> PromptCacheStats | None:
        """The prompt cache's figures, or None where the engine does not count them."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Tokens of raw text, with the model's begin-of-sequence token when it uses one."""
        ...

    @property
    def chat_template(self) -> str:
        """The Jinja chat template the conversation is rendered with: the GGUF's, or the fallback."""
        ...

    def tokenize_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Tokens of the conversation rendered with the model's chat template, ready for the answer.

        ``tools`` (OpenAI's ``{"type": "function", "function": {...}}`` entries) go to the template as its
        ``tools`` variable: only for a template that knows tools (see :mod:`innova_smollm.http.openai.tools`).
        """
        ...

    def tokenize_text(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Tokens of ``text`` as llama.cpp's /tokenize gives them: BOS only with ``add_special``, and special-token
        text (``<|im_start|>``) read as the special token with ``parse_special``."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token renders to, special tokens included (raises ValueError outside the vocabulary)."""
        ...

    def grammar_error(self, grammar: str) -> str | None:
        """None when llama.cpp's GBNF parser accepts this grammar (root rule ``root``), else why not."""
        ...

    def gbnf_grammar(self, grammar: str) -> str:
        """The engine's grammar (what GenerationJob.grammar holds) for a GBNF text that grammar_error accepted;
        raises InvalidRequestError when the engine cannot enforce it."""
        ...

    def json_schema_grammar(self, schema: Mapping[str, Any] | None) -> str:
        """The engine's grammar for JSON that validates against ``schema`` (already checked by
        :func:`innova_smollm.core.schema.check_schema`), or for any JSON object when ``schema`` is None; raises
        InvalidRequestError when the engine cannot enforce it."""
        ...

    def submit(self, job: GenerationJob, sink: TokenSink) -> None:
        """Queue a job; the engine serves jobs first come, first served."""
        ...

    def close(self) -> None:
        """Stop the engine thread (cancelling what is queued) and free the model."""
        ...
