"""The application factory: ``create_app(settings, engine=None)``.

The model loads in a background thread started by the lifespan, so the port opens at once and ``/health`` answers
``loading`` until the model is ready (uvicorn binds only after lifespan start-up returns). Tests pass a ready
``engine`` (or a custom ``loader``) instead of loading from the settings' path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin

from innova_smollm import __version__
from innova_smollm.generation import Engine
from innova_smollm.http_errors import EXCEPTION_HANDLERS
from innova_smollm.routes.smollm import ChatlayaController, SmolLMController
from innova_smollm.service import EngineLoader, SmolLMService, State
from innova_smollm.settings import Settings

log = logging.getLogger(__name__)


def _default_loader(settings: Settings) -> Engine:
    from innova_smollm.engine import load_engine

    return load_engine(settings)


def create_app(settings: Settings, engine: Engine | None = None, *, loader: EngineLoader | None = None) -> Litestar:
    service = SmolLMService(settings, engine=engine, loader=loader or _default_loader)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if service.state is State.LOADING:
            threading.Thread(target=service.load, name="model-loader", daemon=True).start()
        try:
            yield
        finally:
            service.begin_shutdown()
            await _drain(service, settings.drain_timeout_s)
            await anyio.to_thread.run_sync(service.close)

    def provide_service() -> SmolLMService:
        return service

    return Litestar(
        route_handlers=[SmolLMController, ChatlayaController],
        dependencies={"service": Provide(provide_service, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="innova-smollm",
            version=__version__,
            description="A local GGUF chat model for the KORYXA backend. Errors answer "
            '`{"error": {"type", "message", "field"?}}`; 503s carry `Retry-After`.',
            path="/schema",
            render_plugins=[ScalarRenderPlugin()],
        ),
        logging_config=None,  # logs.configure_logging owns the root logger (JSON lines)
        debug=False,
    )


async def _drain(service: SmolLMService, timeout_s: float) -> None:
    """Let admitted requests finish, up to the drain deadline."""
    deadline = time.monotonic() + timeout_s
    while service.in_flight and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    if service.in_flight:
        log.warning("shutting down with %d requests still running", service.in_flight, extra={"event": "drain_timeout"})
