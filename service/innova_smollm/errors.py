"""Domain exceptions. Each carries a stable machine-readable ``type``; ``http.errors`` maps them to HTTP in one place.

This module imports nothing heavy: the in-process API, the engine and the HTTP layer all raise these.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    type = "smollm_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class SettingsError(ServiceError):
    """A configuration value is invalid; start-up stops with this message."""

    type = "invalid_setting"


class InvalidRequestError(ServiceError):
    """The request is malformed or breaks a limit; ``field`` names the culprit."""

    type = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.field = field


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus max_tokens do not fit in the context window. Never truncated silently."""

    type = "context_length_exceeded"

    def __init__(self, *, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        fits = max(0, n_ctx - prompt_tokens)
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
            f"exceeds the context window of {n_ctx} tokens (at most {fits} new tokens fit after this prompt)",
            field="max_tokens" if prompt_tokens < n_ctx else "messages",
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            n_ctx=n_ctx,
            max_tokens_that_fit=fits,
        )


class QueueFullError(ServiceError):
    """Admission refused: the waiting line is full. Retry after ``retry_after_s`` seconds."""

    type = "queue_full"

    def __init__(self, *, waiting: int, max_queue: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server is busy: {waiting} requests are already waiting (SMOLLM_MAX_QUEUE={max_queue}); "
            f"retry in {retry_after_s} s",
            waiting=waiting,
            max_queue=max_queue,
        )
        self.retry_after_s = retry_after_s


class NotReadyError(ServiceError):
    """The model cannot serve: it is loading, failed to load, the service is disabled or shutting down."""

    type = "not_ready"

    def __init__(self, status: str, detail: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(f"the model is not ready ({status}): {detail}", status=status)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ServiceError):
    """The request waited in line past SMOLLM_REQUEST_TIMEOUT_S before its generation could start."""

    type = "timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request waited longer than SMOLLM_REQUEST_TIMEOUT_S={timeout_s:g} s for the model")
        self.timeout_s = timeout_s


class ModelLoadError(ServiceError):
    """A model file could not be loaded; the message names the path and what is wrong with it."""

    type = "model_load_error"


class GenerationError(ServiceError):
    """llama.cpp failed while generating (not the caller's fault)."""

    type = "generation_error"


class AuthenticationError(ServiceError):
    """The request lacks a valid API key."""

    type = "authentication_error"
