"""How outcomes and service state become the native wire types; shared by the routes and the in-process API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from innova_smollm.schemas import Info, ModelInfo, Timings, Usage
from innova_smollm.service import Outcome, SmolLMService


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


def model_info_of(service: SmolLMService, outcome: Outcome) -> ModelInfo:
    return ModelInfo(**service.model_info(outcome.source, outcome.fallback_reason))  # type: ignore[arg-type]


def service_info(service: SmolLMService) -> Info:
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
