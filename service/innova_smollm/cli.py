"""The ``innova-smollm`` command: ``serve``, ``chat "text"``, ``check-model PATH`` and ``memory-budget PATH``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from innova_smollm.errors import ServiceError
from innova_smollm.settings import KVLayout, Settings

if TYPE_CHECKING:
    from innova_smollm.core.types import Engine


class ServerExtraMissingError(ServiceError):
    """A command that serves or loads the model, on an install without the server extra."""

    type = "server_extra_missing"

    def __init__(self, module: str) -> None:
        super().__init__(
            f"the module {module!r} is missing: this command needs the server extra "
            "(pip install 'innova-smollm[server]'); the bare package holds only the client and the health check"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="innova-smollm", description="A local GGUF chat model for KORYXA.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the HTTP API with uvicorn (configured by the environment)")
    chat = commands.add_parser("chat", help="one-shot chat that prints the answer as it streams")
    chat.add_argument("text", help="the user message")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--system", default=None, help="an optional system message")
    check = commands.add_parser("check-model", help="load a GGUF, generate a few tokens, print its metadata")
    check.add_argument("path", type=Path)
    check.add_argument("--json", action="store_true", help="print the metadata as JSON")
    budget = commands.add_parser(
        "memory-budget",
        help="print as JSON the memory the service may hold with a model: file + KV cache + margin (MemoryMax)",
    )
    budget.add_argument("path", type=Path)
    budget.add_argument("--n-ctx", type=int, default=None, help="SMOLLM_N_CTX (default: the environment's)")
    budget.add_argument("--parallel", type=int, default=None, help="SMOLLM_PARALLEL (default: the environment's)")
    budget.add_argument(
        "--kv-layout", choices=[layout.value for layout in KVLayout], default=None, help="SMOLLM_KV_LAYOUT"
    )
    budget.add_argument(
        "--prompt-cache-mb", type=int, default=None, help="SMOLLM_PROMPT_CACHE_MB (default: the environment's)"
    )
    budget.add_argument(
        "--margin-mb", type=int, default=150, help="MB (10^6 bytes) beside the weights and the KV cache (150)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(Settings.from_env())
        if args.command == "chat":
            return chat_once(Settings.from_env(), args.text, args.system, args.max_tokens, args.temperature)
        if args.command == "memory-budget":
            return print_memory_budget(
                args.path,
                n_ctx=args.n_ctx,
                parallel=args.parallel,
                kv_layout=args.kv_layout,
                prompt_cache_mb=args.prompt_cache_mb,
                margin_bytes=args.margin_mb * 1000 * 1000,
            )
        return check_model(args.path, as_json=args.json)
    except ServiceError as exc:
        print(f"innova-smollm: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def serve(settings: Settings) -> int:
    try:
        import uvicorn
        from uvicorn.config import STARTUP_FAILURE

        from innova_smollm.http.app import create_app
        from innova_smollm.http.server import uvicorn_config
    except ImportError as exc:
        raise ServerExtraMissingError(exc.name or "uvicorn") from None
    from innova_smollm.logs import configure_logging

    configure_logging(settings.log_level)
    # No limit_concurrency: uvicorn's counts idle connections too and answers a plain-text 503, health included.
    # SMOLLM_MAX_REQUESTS (http/request_limit.py) counts requests; the connection guard bounds connections.
    config = uvicorn_config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        settings=settings,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
    )
    server = uvicorn.Server(config)
    server.run()
    # As uvicorn.run does: a server that never started (its port taken, say) exits non-zero, so systemd restarts it.
    return 0 if server.started else STARTUP_FAILURE


def chat_once(settings: Settings, text: str, system: str | None, max_tokens: int | None, temperature: float) -> int:
    from innova_smollm.core.service import ModelService, Outcome, RequestOptions
    from innova_smollm.core.sinks import BlockingSink, Failed, Finished, Text
    from innova_smollm.core.types import ChatMessage

    load_engine = _engine_loader()

    service = ModelService(settings, loader=load_engine)
    service.load()
    if service.detail and service.state.value != "ok":
        print(f"innova-smollm: {service.detail}", file=sys.stderr)
        return 2
    messages = [ChatMessage(role="system", content=system)] if system else []
    messages.append(ChatMessage(role="user", content=text))
    prepared = service.prepare_chat(messages, RequestOptions(max_tokens=max_tokens, temperature=temperature))
    try:
        if prepared.job is None or service.engine is None:
            outcome: Outcome = service.run_blocking(prepared)
            print(outcome.text)
            return 0
        sink = BlockingSink()
        service.engine.submit(prepared.job, sink)
        while True:
            event = sink.get()
            if isinstance(event, Text):
                print(event.text, end="", flush=True)
            elif isinstance(event, Finished):
                print()
                return 0
            elif isinstance(event, Failed):
                print(f"\ninnova-smollm: {event.error}", file=sys.stderr)
                return 2
    finally:
        service.close()


def check_model(path: Path, *, as_json: bool) -> int:
    """Exit 0 when the file loads and generates; else exit 1 with a one-line reason (used before a model switch)."""
    from innova_smollm.core.service import ModelService, RequestOptions
    from innova_smollm.core.types import ChatMessage

    load_engine = _engine_loader()
    # One sequence is all a check needs: the smallest KV cache that proves the model loads and decodes.
    settings = dataclasses.replace(Settings.from_env({}), model_path=path.resolve(), n_ctx=512, max_queue=0, parallel=1)
    started = time.perf_counter()
    try:
        engine = load_engine(settings)
    except ServiceError as exc:
        print(f"check-model: FAILED: {exc.message}", file=sys.stderr)
        return 1
    service = ModelService(settings, engine=engine)
    try:
        prepared = service.prepare_chat(
            [ChatMessage(role="user", content="Say hello.")], RequestOptions(max_tokens=8, temperature=0.0)
        )
        outcome = service.run_blocking(prepared)
    except ServiceError as exc:
        print(f"check-model: FAILED: {path}: generation failed: {exc.message}", file=sys.stderr)
        return 1
    finally:
        service.close()
    if outcome.completion_tokens < 1:
        print(f"check-model: FAILED: {path}: the model generated no token", file=sys.stderr)
        return 1
    meta = dataclasses.asdict(engine.metadata)
    meta["check_s"] = round(time.perf_counter() - started, 3)
    meta["sample"] = outcome.text
    if as_json:
        print(json.dumps(meta))
    else:
        print(f"check-model: OK: {path}")
        for key, value in meta.items():
            print(f"  {key}: {value}")
    return 0


def print_memory_budget(
    path: Path,
    *,
    n_ctx: int | None,
    parallel: int | None,
    kv_layout: str | None,
    prompt_cache_mb: int | None,
    margin_bytes: int,
) -> int:
    """The role innova_backend runs this on the host to set the unit's MemoryMax (core/memory_budget.py)."""
    _engine_loader()  # says which extra is missing before llama_cpp is imported
    from innova_smollm.engine.model import memory_budget

    settings = Settings.from_env()
    overrides: dict[str, object] = {"model_path": path.resolve()}
    if n_ctx is not None:
        overrides["n_ctx"] = n_ctx
    if parallel is not None:
        overrides["parallel"] = parallel
    if kv_layout is not None:
        overrides["kv_layout"] = KVLayout(kv_layout)
    if prompt_cache_mb is not None:
        overrides["prompt_cache_mb"] = prompt_cache_mb
    settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
    budget = dataclasses.replace(memory_budget(settings.model_path, settings), margin_bytes=margin_bytes)
    print(json.dumps(budget.as_dict()))
    return 0


def _engine_loader() -> Callable[[Settings], Engine]:
    # Only the engine imports llama_cpp: here it is looked for, to say which extra is missing before anything starts.
    if importlib.util.find_spec("llama_cpp") is None:
        raise ServerExtraMissingError("llama_cpp")
    from innova_smollm.engine import load_engine

    return load_engine
