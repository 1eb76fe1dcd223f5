"""The in-process API: ``get_smollm_model().chat_completion(messages=[...], max_tokens=256)``.

The answer has the same shape as the HTTP chat answer, and the same limits apply: both go through
:class:`~innova_smollm.core.service.ModelService`. The model loads once per process; concurrent callers share it and
are served in order by the engine's single worker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from innova_smollm.core.service import ModelService, Outcome, RequestOptions, State
from innova_smollm.core.types import ChatMessage
from innova_smollm.errors import InvalidRequestError, ModelLoadError
from innova_smollm.http.native.serving import service_info, timings_of, usage_of
from innova_smollm.settings import Settings

_lock = threading.Lock()
_model: SmolLMModel | None = None


class SmolLMModel:
    def __init__(self, settings: Settings, service: ModelService | None = None) -> None:
        if service is None:
            from innova_smollm.engine import load_engine

            service = ModelService(settings, loader=load_engine)
            service.load()
        if service.state is State.ERROR and settings.fallback.value == "none":
            raise ModelLoadError(service.detail or "the model could not be loaded")
        self._service = service

    @property
    def service(self) -> ModelService:
        return self._service

    def chat_completion(
        self,
        messages: Iterable[Mapping[str, str]],
        max_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        chat = [_message(m, index) for index, m in enumerate(messages)]
        options = _options(max_tokens, temperature, top_p, stop, seed)
        outcome = self._service.run_blocking(self._service.prepare_chat(chat, options))
        return {"response": outcome.text, **self._common(outcome)}

    def generate(
        self,
        prompt: str,
        max_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        options = _options(max_tokens, temperature, top_p, stop, seed)
        outcome = self._service.run_blocking(self._service.prepare_generate(prompt, options))
        return {"text": outcome.text, **self._common(outcome)}

    def info(self) -> dict[str, Any]:
        return msgspec.to_builtins(service_info(self._service))  # type: ignore[no-any-return]

    def close(self) -> None:
        self._service.close()

    def _common(self, outcome: Outcome) -> dict[str, Any]:
        return {
            "model_info": self._service.model_info(outcome.source, outcome.fallback_reason),
            "usage": msgspec.to_builtins(usage_of(outcome)),
            "finish_reason": outcome.finish_reason.value,
            "timings": msgspec.to_builtins(timings_of(outcome)),
        }


def _message(raw: Mapping[str, str], index: int) -> ChatMessage:
    role, content = raw.get("role"), raw.get("content")
    if role not in {"system", "user", "assistant"}:
        raise InvalidRequestError(
            f"messages[{index}].role must be system, user or assistant, not {role!r}", field="messages"
        )
    if not isinstance(content, str):
        raise InvalidRequestError(f"messages[{index}].content must be a string", field="messages")
    return ChatMessage(role=role, content=content)


def _options(
    max_tokens: int | None, temperature: float, top_p: float, stop: str | list[str] | None, seed: int | None
) -> RequestOptions:
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", field="max_tokens")
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError("temperature must be between 0 and 2", field="temperature")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError("top_p must be in (0, 1]", field="top_p")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return RequestOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed)


def get_smollm_model() -> SmolLMModel:
    global _model
    if _model is None:
        with _lock:
            if _model is None:
                _model = SmolLMModel(Settings.from_env())
    return _model
