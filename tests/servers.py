"""What the integration and system tiers share: the real embedded model, a real engine, real uvicorn on loopback.

One llama.cpp engine is loaded per test session and shared by the in-thread servers, which keeps the suite fast;
tests that need their own process (start-up errors, signals, the CLI) start ``innova-smollm`` as a subprocess.
The tiers' conftest files import the fixtures from here; the unit tier does not, so it never imports llama_cpp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn

from innova_smollm.core.service import EngineLoader
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.http.app import create_app
from innova_smollm.http.server import uvicorn_config
from innova_smollm.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
API = "/innova/api/smollm"

#: A prompt the embedded model continues for as long as it is allowed to (it counts), for tests that need a
#: generation that is still running when they act.
LONG_PROMPT = "Count from 1 to 1000: 1, 2, 3, 4,"
#: ``logit_bias`` that forbids the embedded model's end tokens (``<|endoftext|>`` 0 and ``<|im_end|>`` 2), for a test
#: that needs an answer to run until its deadline or ``max_tokens`` however the model would have answered.
NEVER_ENDS = {"0": -100, "2": -100}

#: Two OpenAI tool definitions the tool-call tests share (openai SDK, LangChain, the client library).
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
EXAMPLE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an email",
            "parameters": {
                "type": "object",
                "properties": {"to": {"type": "string", "maxLength": 30}},
                "required": ["to"],
            },
        },
    },
]


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not EMBEDDED_MODEL.exists():
        pytest.fail(f"{EMBEDDED_MODEL} is missing: run `python3 scripts/fetch_model.py` (make test does it)")
    return EMBEDDED_MODEL


def make_settings(model_path: Path, **overrides: Any) -> Settings:
    base = Settings.from_env({"SMOLLM_MODEL_PATH": str(model_path), "SMOLLM_N_CTX": "1024", "SMOLLM_N_THREADS": "2"})
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[GGUFEngine]:
    loaded = GGUFEngine(make_settings(model_path))
    yield loaded
    loaded.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class LiveServer:
    url: str
    settings: Settings

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def connect(self) -> socket.socket:
        """A raw TCP connection, for requests no HTTP client would send."""
        return socket.create_connection(self.address, timeout=30)


@contextlib.contextmanager
def serve_in_thread(
    settings: Settings, engine: Any = None, loader: EngineLoader | None = None, *, send_buffer: int | None = None
) -> Iterator[LiveServer]:
    """A real uvicorn server on a free loopback port, running the app in a background thread.

    ``send_buffer`` sets the listening socket's SO_SNDBUF, which Linux hands down to every accepted connection: on
    loopback the kernel otherwise lets a socket queue megabytes, where a slow network path gives it a few kilobytes.
    """
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    settings = dataclasses.replace(settings, port=port)
    app = create_app(settings, engine=engine, loader=loader)
    config = uvicorn_config(app, host="127.0.0.1", port=port, settings=settings, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", settings=settings)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        listener.close()


@pytest.fixture(scope="module")
def live(engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    """A server with the shared real engine, loaded and ready."""
    with serve_in_thread(make_settings(model_path, max_tokens=512, max_queue=4), engine=engine) as server:
        yield server


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def forget_cached_prompt(live: LiveServer) -> None:
    """Leave the engine's KV cache holding nothing the next chat prompt can reuse.

    The engine keeps the previous prompt in its KV cache and decodes only what differs. The same prompt sent twice is
    decoded once as a batch of tokens and the second time as its last token alone, and llama.cpp's CPU kernels do not
    give bit-identical logits for different batch shapes (llama-server documents the same for ``cache_prompt``), so
    a greedy near-tie can flip between the two. A raw-text request in between (no chat template, so no shared prefix)
    gives both requests the same work from the same state. The 2 + 2 prompt flipped this way on an AVX2-only CPU.
    """
    reply = live.post(f"{API}/generate", json={"prompt": "Reset.", "max_tokens": 1, "temperature": 0})
    assert reply.status_code == 200, reply.text


def parse_sse(raw: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


@dataclasses.dataclass
class ServiceProcess:
    process: subprocess.Popen[str]
    url: str
    _lines: list[str] = dataclasses.field(default_factory=list)
    _reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        # Read the pipe as the service writes: a pipe nobody reads fills at 64 KiB of log lines, and the service's
        # next log write then blocks whatever thread makes it.
        self._reader = threading.Thread(target=self._drain, name="service-stdout", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)

    def output(self) -> str:
        """Everything the process printed; stops it first."""
        self.stop()
        if self._reader is not None:
            self._reader.join(timeout=30)
        return "".join(self._lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def run_service(
    env: Mapping[str, str], *, wait_for_port: bool = True, new_session: bool = False, nofile: int | None = None
) -> Iterator[ServiceProcess]:
    """``innova-smollm serve`` as its own process, as systemd runs it (``new_session``: in a session of its own,
    which Linux's autogroup scheduler treats like a separate service when it shares the CPU; ``nofile``: its
    open-file limit, soft and hard, as the unit's LimitNOFILE sets it)."""
    port = free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SMOLLM_", "ENABLE_SMOLLM", "PROVIDER"))},
        "PORT": str(port),
        "SMOLLM_N_CTX": "1024",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "innova_smollm", "serve"],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        start_new_session=new_session,
        preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
    )
    service = ServiceProcess(process=process, url=f"http://127.0.0.1:{port}")
    try:
        if wait_for_port:
            up = wait_until(lambda: _port_open(port) or process.poll() is not None, timeout=60)
            if not up or process.poll() is not None:
                raise RuntimeError(f"the service did not start: {service.output()}")
        yield service
    finally:
        service.output()  # stops the process and waits for the reader to see the end of the pipe
        if process.stdout is not None:
            process.stdout.close()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
