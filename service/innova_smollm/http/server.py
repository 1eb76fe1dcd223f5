"""How uvicorn serves the app: stock uvicorn with its uvloop event loop and httptools parser, through ASGI only.

Why uvloop and httptools rather than asyncio and h11: each streamed chunk costs the event loop a wake-up, an SSE
frame and a socket write, and on a 2-core host that CPU is taken from llama.cpp's decode threads. Both are uvicorn's
own options, so nothing here depends on uvicorn's internals.

What a client that does not speak HTTP gets: a request line or header httptools cannot parse is answered by uvicorn
itself, with a plain-text ``400 Bad Request`` (not the service's JSON error body, which only the app can write; the
README says so). A body over SMOLLM_MAX_BODY_BYTES is a JSON 413 from the app.
"""

from __future__ import annotations

from typing import Any

import uvicorn


def uvicorn_config(app: Any, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration every server of this app uses (the CLI, the tests, the benchmark scripts)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        **options,
    )
