"""How uvicorn serves the app: stock uvicorn with its uvloop event loop and httptools parser, behind the connection
guard, through ASGI only.

Why uvloop and httptools rather than asyncio and h11: each streamed chunk costs the event loop a wake-up, an SSE
frame and a socket write, and on a 2-core host that CPU is taken from llama.cpp's decode threads. Both are uvicorn's
own options, so nothing here depends on uvicorn's internals.

The protocol uvicorn runs is its own httptools protocol wrapped by :mod:`innova_smollm.http.connections` (given
through uvicorn's public ``http=`` option): request heads are bounded in size (16 KiB, a JSON 400) and time
(SMOLLM_HEAD_TIMEOUT_S, a JSON 408), stalled bodies and answers by SMOLLM_IO_TIMEOUT_S, idle keep-alive by
SMOLLM_KEEP_ALIVE_S (uvicorn's ``timeout_keep_alive``), and connections by the open-file limit. uvicorn's
``limit_concurrency`` is not used: it counts idle connections; SMOLLM_MAX_REQUESTS counts requests in the app.

What a client that does not speak HTTP gets: a request line or header httptools cannot parse is answered by uvicorn
itself, with a plain-text ``400 Bad Request`` (not the service's JSON error body, which only the app or the guard
can write; the README says so). A body over SMOLLM_MAX_BODY_BYTES is a JSON 413 from the app.
"""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from innova_smollm.http.connections import describe, guarded_protocol, open_file_limit, policy_from
from innova_smollm.settings import Settings

log = logging.getLogger(__name__)


def uvicorn_config(
    app: Any, *, host: str, port: int, settings: Settings | None = None, **options: Any
) -> uvicorn.Config:
    """The uvicorn configuration every server of this app uses (the CLI, the tests, the benchmark scripts).

    ``settings`` gives the connection bounds (the defaults without it).
    """
    settings = settings or Settings()
    stock = uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", log_config=None)
    stock.load()
    nofile = open_file_limit()
    policy = policy_from(settings, nofile)
    log.info(
        "connection bounds: %s (open-file limit %d)",
        ", ".join(f"{k}={v}" for k, v in describe(policy).items()),
        nofile,
        extra={"event": "connection_bounds", "open_file_limit": nofile, **describe(policy)},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=guarded_protocol(stock.http_protocol_class, policy),
        timeout_keep_alive=settings.keep_alive_s,
        log_config=None,
        access_log=False,
        **options,
    )
