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
from litestar.openapi.spec import Components, Reference, SecurityScheme

from innova_smollm import __version__
from innova_smollm.core.service import EngineLoader, ModelService, State
from innova_smollm.core.types import Engine
from innova_smollm.http.auth import api_key_guard
from innova_smollm.http.connections import ConnectionHooks
from innova_smollm.http.errors import EXCEPTION_HANDLERS, JSONBodyRequest
from innova_smollm.http.metrics import Metrics, metrics_endpoint
from innova_smollm.http.native.routes import ChatlayaController, NativeController, detokenize, tokenize
from innova_smollm.http.openai import routes as openai
from innova_smollm.http.request_limit import RequestLimit
from innova_smollm.http.requestlog import RequestLog
from innova_smollm.settings import Settings

log = logging.getLogger(__name__)


def _default_loader(settings: Settings) -> Engine:
    from innova_smollm.engine import load_engine

    return load_engine(settings)


def create_app(settings: Settings, engine: Engine | None = None, *, loader: EngineLoader | None = None) -> Litestar:
    metrics = Metrics()
    service = ModelService(settings, engine=engine, loader=loader or _default_loader, observer=metrics)
    metrics.track(service)

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

    def provide_service() -> ModelService:
        return service

    def provide_metrics() -> Metrics:
        return metrics

    bearer: dict[str, SecurityScheme | Reference] = {
        "bearer": SecurityScheme(type="http", scheme="bearer", description="One of SMOLLM_API_KEYS.")
    }
    app = Litestar(
        route_handlers=[NativeController, ChatlayaController, tokenize, detokenize, openai.router, metrics_endpoint],
        dependencies={
            "service": Provide(provide_service, sync_to_thread=False),
            "metrics": Provide(provide_metrics, sync_to_thread=False),
        },
        guards=[api_key_guard(settings.api_keys)] if settings.api_keys else [],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_class=JSONBodyRequest,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="innova-smollm",
            version=__version__,
            description="A local GGUF chat model for the KORYXA backend. Native errors answer "
            '`{"error": {"type", "message", "field"?}}`; `/v1` is OpenAI-compatible and answers errors in OpenAI\'s '
            "shape. 503s carry `Retry-After`. With SMOLLM_API_KEYS set, every route but health needs "
            "`Authorization: Bearer <key>`.",
            path="/schema",
            render_plugins=[ScalarRenderPlugin()],
            components=Components(security_schemes=bearer if settings.api_keys else None),
            security=[{"bearer": []}] if settings.api_keys else None,
        ),
        logging_config=None,  # logs.configure_logging owns the root logger (JSON lines)
        debug=False,
    )
    # Around Litestar's whole handler (routing and exception handling included), so that every request, even a 404
    # or a 401, gets its log line, its X-Request-ID and its count; route middleware would miss unmatched paths.
    # Inside out: the request limit (its 503s are logged and counted), the log, and outermost the hooks that tell
    # the connection guard (http/connections.py) when a request starts and ends and bound stalled reads and writes.
    limited = RequestLimit(app.asgi_handler, limit=settings.max_requests)
    logged = RequestLog(limited, log_content=settings.log_content, on_finish=metrics.on_request)
    app.asgi_handler = ConnectionHooks(logged)
    return app


async def _drain(service: ModelService, timeout_s: float) -> None:
    """Let admitted requests finish, up to the drain deadline."""
    deadline = time.monotonic() + timeout_s
    while service.in_flight and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    if service.in_flight:
        log.warning("shutting down with %d requests still running", service.in_flight, extra={"event": "drain_timeout"})
