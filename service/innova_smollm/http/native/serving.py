"""The native API mapped onto the service: requests to options, outcomes and service state to the native wire types
(shared by the routes and the in-process API), and the native stream's framing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from innova_smollm.core.service import Chunk, ModelService, Outcome, RequestOptions
from innova_smollm.core.types import ChatMessage, TokenLogprob
from innova_smollm.http.constraints import constraint_of, logit_bias_of
from innova_smollm.http.errors import ErrorFormat, native_error
from innova_smollm.http.native.protocol import (
    ChatRequest,
    ChatResponse,
    Choice,
    GenerateResponse,
    Info,
    ModelInfo,
    SamplingFields,
    StreamDone,
    StreamToken,
    Timings,
    TokenLogprobs,
    TopToken,
    Usage,
)
from innova_smollm.http.streaming import frame


def options_from(data: SamplingFields) -> RequestOptions:
    stop = data.stop if isinstance(data.stop, list) else [data.stop] if data.stop else []
    return RequestOptions(
        max_tokens=data.max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        min_p=data.min_p,
        repeat_penalty=data.repeat_penalty,
        frequency_penalty=data.frequency_penalty,
        presence_penalty=data.presence_penalty,
        logit_bias=logit_bias_of(data.logit_bias),
        stop=tuple(stop),
        seed=data.seed,
        constraint=constraint_of(data.response_format, data.grammar),
        logprobs=data.logprobs,
        n=data.n,
    )


def messages_from(data: ChatRequest) -> list[ChatMessage]:
    return [ChatMessage(role=m.role, content=m.content) for m in data.messages]


def logprobs_of(entries: Sequence[TokenLogprob] | None) -> list[TokenLogprobs] | None:
    if entries is None:
        return None

    def text(token: bytes) -> str:
        return token.decode("utf-8", errors="replace")

    return [
        TokenLogprobs(
            token=text(entry.token),
            logprob=entry.logprob,
            top_logprobs=[TopToken(token=text(token), logprob=logprob) for token, logprob in entry.top],
        )
        for entry in entries
    ]


def choices_of(outcome: Outcome, *, with_text: bool) -> list[Choice] | msgspec.UnsetType:
    """Every choice of an answer with ``n`` > 1 (UNSET, so absent, for one choice)."""
    if len(outcome.choices) < 2:
        return msgspec.UNSET
    return [
        Choice(
            index=choice.index,
            text=choice.text if with_text else None,
            finish_reason=choice.finish_reason.value,
            completion_tokens=choice.completion_tokens,
            logprobs=logprobs_of(choice.logprobs),
        )
        for choice in outcome.choices
    ]


def usage_of(outcome: Outcome) -> Usage:
    return Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
    )


def timings_of(outcome: Outcome) -> Timings:
    speed = outcome.tokens_per_second
    return Timings(
        queue_ms=round(outcome.queue_s * 1000, 2),
        first_token_ms=None if outcome.first_token_s is None else round(outcome.first_token_s * 1000, 2),
        total_ms=round(outcome.total_s * 1000, 2),
        tokens_per_second=None if speed is None else round(speed, 2),
    )


def model_info_of(service: ModelService, outcome: Outcome) -> ModelInfo:
    return ModelInfo(**service.model_info(outcome.source, outcome.fallback_reason))  # type: ignore[arg-type]


def service_info(service: ModelService) -> Info:
    settings = service.settings
    meta = service.metadata()
    return Info(
        state=service.state.value,
        detail=service.detail,
        provider=settings.provider.value,
        fallback=settings.fallback.value,
        model_path=str(settings.model_path),
        model_name=meta.name if meta else settings.model_name,
        architecture=meta.architecture if meta else None,
        parameters=meta.parameters if meta else None,
        file_size_bytes=meta.file_size_bytes if meta else None,
        quantization=meta.quantization if meta else None,
        n_ctx=meta.n_ctx if meta else settings.n_ctx,
        n_ctx_train=meta.n_ctx_train if meta else None,
        n_threads=settings.n_threads,
        decode_threads=service.engine.threads.settled() if service.engine is not None else None,
        n_gpu_layers=meta.n_gpu_layers if meta else settings.n_gpu_layers,
        device=meta.device if meta else "none",
        has_chat_template=meta.has_chat_template if meta else None,
        chat_template_source=meta.chat_template_source if meta else None,
        vocab_size=meta.vocab_size if meta else None,
        llama_cpp_python_version=meta.llama_cpp_python_version if meta else None,
        load_time_s=meta.load_time_s if meta else None,
        flash_attn=meta.flash_attn if meta else None,
        parallel=settings.parallel,
        kv_layout=meta.kv_layout if meta else settings.kv_layout.value,
        step_tokens=meta.step_tokens if meta else None,
        max_queue=settings.max_queue,
        max_tokens=settings.max_tokens,
        in_flight=service.in_flight,
        deployment=read_deployment(settings.model_manifest),
    )


def read_deployment(manifest: Path | None) -> dict[str, Any] | None:
    """The deployed-model record (current and previous: name, sha256, when), read fresh on every call.

    It is the provisioning's record, not the service's: a missing or unreadable file is reported, never fatal.
    """
    if manifest is None:
        return None
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read {manifest}: {exc}"}
    return record if isinstance(record, dict) else {"error": f"{manifest} does not hold a JSON object"}


class NativeWire:
    """The native answer: a JSON body, or SSE ``token`` events with text chunks, then one ``done`` event (an
    ``error`` event if generation fails after the 200)."""

    def __init__(self, service: ModelService, *, chat: bool) -> None:
        # An instance attribute: a function kept on the class would be bound to the instance when looked up.
        self.error_format: ErrorFormat = native_error
        self._service = service
        self._chat = chat

    def whole(self, outcome: Outcome) -> ChatResponse | GenerateResponse:
        info, usage, timings = model_info_of(self._service, outcome), usage_of(outcome), timings_of(outcome)
        if self._chat:
            return ChatResponse(
                response=outcome.text,
                model_info=info,
                usage=usage,
                finish_reason=outcome.finish_reason.value,
                timings=timings,
                logprobs=logprobs_of(outcome.logprobs),
                choices=choices_of(outcome, with_text=True),
            )
        return GenerateResponse(
            text=outcome.text,
            model_info=info,
            usage=usage,
            finish_reason=outcome.finish_reason.value,
            timings=timings,
            logprobs=logprobs_of(outcome.logprobs),
            choices=choices_of(outcome, with_text=True),
        )

    def opening(self) -> Sequence[bytes]:
        return ()

    def text(self, chunk: Chunk) -> bytes:
        return frame("token", StreamToken(text=chunk.text, index=chunk.choice, logprobs=logprobs_of(chunk.logprobs)))

    def closing(self, outcome: Outcome) -> Sequence[bytes]:
        done = StreamDone(
            finish_reason=outcome.finish_reason.value,
            usage=usage_of(outcome),
            model_info=model_info_of(self._service, outcome),
            timings=timings_of(outcome),
            logprobs=logprobs_of(outcome.logprobs),
            choices=choices_of(outcome, with_text=False),
        )
        return (frame("done", done),)

    def failure(self, error_body: object) -> Sequence[bytes]:
        return (frame("error", error_body),)
