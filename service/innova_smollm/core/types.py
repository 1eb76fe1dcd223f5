"""What flows between the service layer and an engine: jobs in, text chunks out.

An engine owns one llama.cpp context and the single thread that touches it. Callers hand it a
:class:`GenerationJob` with a :class:`TokenSink`; the engine thread calls the sink as tokens come and checks
``sink.cancelled()`` between tokens, so a caller that goes away stops its generation within a token or two.
This module is pure: no llama_cpp, no litestar.
"""

from __future__ import annotations

import itertools
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
class ChatMessage:
    role: str
    content: str


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
    """Receives one job's output. Every method is called from the engine thread, so each must return quickly."""

    def cancelled(self) -> bool:
        """True once the caller no longer wants the output; the engine then stops this job."""
        ...

    def started(self) -> None:
        """The job left the queue and its prompt is being processed."""
        ...

    def text(self, chunk: str) -> None:
        """A piece of the answer, already cut at stop strings and at whole UTF-8 characters."""
        ...

    def finished(
        self, reason: FinishReason, completion_tokens: int, logprobs: Sequence[TokenLogprob] | None = None
    ) -> None:
        """The job ended; no call follows. ``logprobs``: one per answer token when the job asked for them."""
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

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Tokens of the conversation rendered with the model's chat template, ready for the answer."""
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
