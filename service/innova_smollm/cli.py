"""The ``innova-smollm`` command: ``serve``, ``chat "text"`` and ``check-model PATH``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from innova_smollm.errors import SmolLMError
from innova_smollm.settings import Settings


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
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(Settings.from_env())
        if args.command == "chat":
            return chat_once(Settings.from_env(), args.text, args.system, args.max_tokens, args.temperature)
        return check_model(args.path, as_json=args.json)
    except SmolLMError as exc:
        print(f"innova-smollm: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def serve(settings: Settings) -> int:
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from innova_smollm.app import create_app
    from innova_smollm.http_server import uvicorn_config
    from innova_smollm.logs import configure_logging

    configure_logging(settings.log_level)
    config = uvicorn_config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        limit_concurrency=max(64, 4 * (settings.parallel + settings.max_queue)),
    )
    server = uvicorn.Server(config)
    server.run()
    # As uvicorn.run does: a server that never started (its port taken, say) exits non-zero, so systemd restarts it.
    return 0 if server.started else STARTUP_FAILURE


def chat_once(settings: Settings, text: str, system: str | None, max_tokens: int | None, temperature: float) -> int:
    from innova_smollm.engine import load_engine
    from innova_smollm.generation import ChatMessage
    from innova_smollm.service import Outcome, RequestOptions, SmolLMService
    from innova_smollm.sinks import BlockingSink, Failed, Finished, Text

    service = SmolLMService(settings, loader=load_engine)
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
    from innova_smollm.engine import load_engine
    from innova_smollm.generation import ChatMessage
    from innova_smollm.service import RequestOptions, SmolLMService

    settings = dataclasses.replace(Settings.from_env({}), model_path=path.resolve(), n_ctx=512, max_queue=0)
    started = time.perf_counter()
    try:
        engine = load_engine(settings)
    except SmolLMError as exc:
        print(f"check-model: FAILED: {exc.message}", file=sys.stderr)
        return 1
    service = SmolLMService(settings, engine=engine)
    try:
        prepared = service.prepare_chat(
            [ChatMessage(role="user", content="Say hello.")], RequestOptions(max_tokens=8, temperature=0.0)
        )
        outcome = service.run_blocking(prepared)
    except SmolLMError as exc:
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


if __name__ == "__main__":
    sys.exit(main())
