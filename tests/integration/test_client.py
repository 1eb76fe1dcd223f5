"""The client against the real service (real uvicorn, real model), nothing listening, and 503-answering services.

Retry counts are read from the policy's ``before_attempt`` hook, and tests shrink the waits so they stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import requests
import tenacity

from innova_smollm.core.types import Engine
from innova_smollm.errors import ModelLoadError
from innova_smollm.ops.client import (
    AuthenticationFailedError,
    BadRequestError,
    ResponseTimeoutError,
    RetryPolicy,
    ServiceUnavailableError,
    ServiceUnreachableError,
    SmolLMClient,
    StreamError,
    UnexpectedResponseError,
    is_retryable,
    parse_retry_after,
)
from innova_smollm.settings import Settings
from tests.servers import (
    EXAMPLE_TOOLS,
    LONG_PROMPT,
    REPO_ROOT,
    LiveServer,
    free_port,
    make_settings,
    serve_in_thread,
)

# --- helpers shared with test_healthcheck ----------------------------------------------------------------------


@dataclasses.dataclass
class Attempts:
    """Counts attempts and records how long the policy had slept before each one."""

    idle_before: list[float] = dataclasses.field(default_factory=list)

    def __call__(self, retry_state: tenacity.RetryCallState) -> None:
        self.idle_before.append(retry_state.idle_for)

    @property
    def count(self) -> int:
        return len(self.idle_before)


def quick_policy(attempts: Attempts, **overrides: Any) -> RetryPolicy:
    values: dict[str, Any] = {
        "max_attempts": 3,
        "max_total_s": 20.0,
        "initial_wait_s": 0.01,
        "max_wait_s": 0.05,
        "jitter_s": 0.0,
        "retry_after_cap_s": 0.05,
    }
    return RetryPolicy(**{**values, **overrides}, before_attempt=attempts)


class SharedEngine:
    """The session's engine seen through a loader: the service that loads it would close it, this one must not."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def loading_service(engine: Engine, model_path: Path) -> Iterator[tuple[LiveServer, threading.Event]]:
    """A real service that stays in `loading` (503 + Retry-After: 5) until the test sets the event."""
    gate = threading.Event()

    def loader(settings: Settings) -> Engine:
        gate.wait(timeout=120)
        return SharedEngine(engine)

    with serve_in_thread(make_settings(model_path, drain_timeout_s=1.0), loader=loader) as server:
        try:
            yield server, gate
        finally:
            gate.set()


@contextlib.contextmanager
def failed_service(model_path: Path) -> Iterator[LiveServer]:
    """A real service whose model failed to load: 503 `error`, which waiting does not fix."""

    def loader(settings: Settings) -> Engine:
        raise ModelLoadError(f"{settings.model_path}: not a GGUF file (test)")

    with serve_in_thread(make_settings(model_path), loader=loader) as server:
        yield server


@contextlib.contextmanager
def busy_service(engine: Engine, model_path: Path) -> Iterator[tuple[LiveServer, Callable[[], None]]]:
    """A real service with no queue (SMOLLM_MAX_QUEUE=0) whose only slot a long stream holds: 503 queue_full.

    Calling the second item closes that stream, which frees the slot.
    """
    settings = make_settings(model_path, parallel=1, max_queue=0, max_tokens=1000, drain_timeout_s=5.0)
    with serve_in_thread(settings, engine=engine) as server, SmolLMClient(server.url) as holder:
        hold = holder.stream_generate(LONG_PROMPT, max_tokens=900, temperature=0)
        try:
            next(hold)  # admitted and generating
            yield server, hold.close
        finally:
            hold.close()


Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclasses.dataclass
class Stub:
    url: str
    requests: list[tuple[str, str, dict[str, str]]]


@contextlib.contextmanager
def stub_server(handle: Handler) -> Iterator[Stub]:
    """A loopback HTTP server answering whatever ``handle`` writes, for answers the real service never gives."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    class RequestHandler(http.server.BaseHTTPRequestHandler):
        def _any(self) -> None:
            seen.append((self.command, self.path, dict(self.headers)))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            handle(self)

        do_GET = do_POST = _any  # noqa: N815 - http.server's naming

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Stub(url=f"http://127.0.0.1:{server.server_address[1]}", requests=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def send(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


# --- against the real service ----------------------------------------------------------------------------------


def test_chat_generate_info_and_health_against_the_real_model(live: LiveServer) -> None:
    with SmolLMClient(live.url) as client:
        assert client.health().status == "ok"
        info = client.info()
        assert info["state"] == "ok"
        assert info["model_name"] == "SmolLM2-135M-Instruct.Q4_1"

        answer = client.chat([{"role": "user", "content": "Name a fruit."}], max_tokens=6, temperature=0)
        assert answer.text.strip()
        assert answer.finish_reason in {"stop", "length"}
        assert 1 <= answer.usage.completion_tokens <= 6
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        assert answer.model_info["model_name"] == "SmolLM2-135M-Instruct.Q4_1"
        assert answer.timings["total_ms"] > 0

        continued = client.generate(LONG_PROMPT, max_tokens=4, temperature=0)
        assert continued.text.strip().startswith("5")
        assert continued.finish_reason == "length"


def test_stream_yields_text_chunks_then_the_result(live: LiveServer) -> None:
    with SmolLMClient(live.url) as client:
        with client.stream("Say hello.", max_tokens=12, temperature=0) as chunks:
            received = list(chunks)
        assert len(received) > 1
        result = chunks.result
        assert result.text == "".join(received)
        assert result.usage.completion_tokens <= 12
        assert result.finish_reason in {"stop", "length"}
        assert result.model_info["provider"] == "local"
        # The same greedy request without streaming gives the same text.
        assert client.chat("Say hello.", max_tokens=12, temperature=0).text == result.text

        with client.stream_generate(LONG_PROMPT, max_tokens=6, temperature=0) as chunks:
            text = "".join(chunks)
        assert chunks.result.finish_reason == "length"
        assert text == chunks.result.text


def test_result_before_the_end_of_a_stream_is_an_error(live: LiveServer) -> None:
    with SmolLMClient(live.url) as client, client.stream_generate(LONG_PROMPT, max_tokens=50) as chunks:
        next(chunks)
        with pytest.raises(RuntimeError, match="not finished"):
            _ = chunks.result


def test_a_bad_request_names_the_field_and_is_not_retried(live: LiveServer) -> None:
    attempts = Attempts()
    with SmolLMClient(live.url, retry=quick_policy(attempts)) as client:
        with pytest.raises(BadRequestError) as caught:
            client.chat("Hi", max_tokens=100_000)
        assert caught.value.status_code == 400
        assert caught.value.field == "max_tokens"
        assert caught.value.error_type == "invalid_request"
        with pytest.raises(BadRequestError) as caught:
            client.chat("Hi", max_tokne=3)  # a typo the server names
        assert "max_tokne" in caught.value.message
    assert attempts.count == 2


def test_a_read_timeout_is_never_retried(live: LiveServer) -> None:
    attempts = Attempts()
    with SmolLMClient(live.url, timeout=(2.0, 0.3), retry=quick_policy(attempts, max_attempts=5)) as client:
        started = time.monotonic()
        with pytest.raises(ResponseTimeoutError):
            client.generate(LONG_PROMPT, max_tokens=400, temperature=0)
    assert attempts.count == 1
    assert time.monotonic() - started < 5


def test_the_api_key_is_sent_as_a_bearer_token() -> None:
    with (
        stub_server(lambda h: send(h, 200, b'{"status": "ok"}', "application/json")) as stub,
        SmolLMClient(stub.url, api_key="k" * 20) as client,
    ):
        client.health()
        assert stub.requests[0][2]["Authorization"] == "Bearer " + "k" * 20
        assert "k" * 20 not in repr(client)


def test_a_refused_api_key_raises_authentication_failed_without_retry(model_path: Path, engine: Engine) -> None:
    key = "s3cret-key-0123456789"
    with serve_in_thread(make_settings(model_path, api_keys=(key,)), engine=engine) as server:
        unkeyed = requests.post(f"{server.url}/innova/api/smollm/chat", json={"messages": []}, timeout=10)
        assert unkeyed.status_code == 401
        attempts = Attempts()
        with SmolLMClient(server.url, api_key="wrong-key-0123456789", retry=quick_policy(attempts)) as client:
            with pytest.raises(AuthenticationFailedError) as caught:
                client.chat("Hi", max_tokens=1)
            assert caught.value.status_code == 401
            assert attempts.count == 1
            assert client.health().status == "ok"  # health never needs a key
        with SmolLMClient(server.url, api_key=key) as client:
            assert client.chat("Hi", max_tokens=2, temperature=0).usage.completion_tokens >= 1


# --- nothing listening ----------------------------------------------------------------------------------------


def test_nothing_listening_is_retried_then_reported_as_unreachable() -> None:
    attempts = Attempts()
    url = f"http://127.0.0.1:{free_port()}"
    with (
        SmolLMClient(url, retry=quick_policy(attempts, max_attempts=4)) as client,
        pytest.raises(ServiceUnreachableError, match="connection refused"),
    ):
        client.chat("Hi")
    assert attempts.count == 4
    # Exponential backoff from 0.01 s, capped at 0.05 s: 0.01, 0.02, 0.04 slept in all, cumulated.
    assert attempts.idle_before == pytest.approx([0.0, 0.01, 0.03, 0.07])


def test_total_time_bounds_the_retries() -> None:
    attempts = Attempts()
    policy = quick_policy(attempts, max_attempts=10_000, max_total_s=0.5, max_wait_s=0.1, initial_wait_s=0.1)
    with SmolLMClient(f"http://127.0.0.1:{free_port()}", retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(ServiceUnreachableError):
            client.health()
    assert time.monotonic() - started < 0.5 + 0.3
    assert 3 <= attempts.count <= 6


def test_timeouts_map_to_the_right_errors_and_only_connect_timeouts_retry() -> None:
    class TimingOutSession(requests.Session):
        def __init__(self, exc: type[Exception]) -> None:
            super().__init__()
            self.exc, self.calls = exc, 0

        def request(self, *args: Any, **kwargs: Any) -> requests.Response:
            self.calls += 1
            assert kwargs["timeout"] == (1.0, 2.0)
            raise self.exc("simulated")

    for exc, expected, calls in [
        (requests.exceptions.ConnectTimeout, ServiceUnreachableError, 3),
        (requests.exceptions.ReadTimeout, ResponseTimeoutError, 1),
    ]:
        session = TimingOutSession(exc)
        client = SmolLMClient(timeout=(1.0, 2.0), retry=quick_policy(Attempts()), session=session)
        with pytest.raises(expected):
            client.info()
        assert session.calls == calls, exc


# --- services answering 503 ------------------------------------------------------------------------------------


def test_loading_503_is_retried_after_the_capped_retry_after(engine: Engine, model_path: Path) -> None:
    attempts = Attempts()
    # A 10 s exponential backoff would show if Retry-After (5 s, capped at 0.05 s) were ignored.
    policy = quick_policy(attempts, initial_wait_s=10.0, max_wait_s=10.0)
    with loading_service(engine, model_path) as (server, _), SmolLMClient(server.url, retry=policy) as client:
        with pytest.raises(ServiceUnavailableError) as caught:
            client.health()
        assert caught.value.state == "loading"
        assert caught.value.retry_after == 5.0
        assert caught.value.retryable
        assert attempts.idle_before == pytest.approx([0.0, 0.05, 0.10])

        with pytest.raises(ServiceUnavailableError) as caught:
            client.chat("Hi", max_tokens=1)
        assert caught.value.error_type == "not_ready"
        assert caught.value.state == "loading"
        assert attempts.count == 6


def test_retries_carry_a_request_through_the_end_of_loading(engine: Engine, model_path: Path) -> None:
    attempts = Attempts()
    policy = quick_policy(attempts, max_attempts=1000, max_total_s=60.0, retry_after_cap_s=0.1)
    with loading_service(engine, model_path) as (server, gate), SmolLMClient(server.url, retry=policy) as client:
        threading.Timer(0.5, gate.set).start()
        answer = client.chat("Hi", max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens >= 1
    assert attempts.count >= 3


def test_a_failed_model_is_reported_at_once_not_retried(model_path: Path) -> None:
    attempts = Attempts()
    with failed_service(model_path) as server, SmolLMClient(server.url, retry=quick_policy(attempts)) as client:
        with pytest.raises(ServiceUnavailableError) as caught:
            client.health()
        assert caught.value.state == "error"
        assert "not a GGUF file" in caught.value.message
        assert not caught.value.retryable
    assert attempts.count == 1


def test_queue_full_is_retried_and_succeeds_once_the_slot_frees(engine: Engine, model_path: Path) -> None:
    attempts = Attempts()
    with busy_service(engine, model_path) as (server, release):
        with SmolLMClient(server.url, retry=quick_policy(attempts)) as client:
            with pytest.raises(ServiceUnavailableError) as caught:
                client.chat("Hi", max_tokens=1)
            assert caught.value.error_type == "queue_full"
            assert caught.value.retry_after is not None and caught.value.retry_after >= 1
            assert attempts.count == 3
            # A stream is retried too, as long as it has not started.
            with pytest.raises(ServiceUnavailableError):
                client.stream("Hi", max_tokens=1)
            assert attempts.count == 6

        patience = Attempts()
        policy = quick_policy(patience, max_attempts=1000, max_total_s=60.0)
        with SmolLMClient(server.url, retry=policy) as patient:
            threading.Timer(0.3, release).start()
            assert patient.generate("Hi", max_tokens=1, temperature=0).usage.completion_tokens == 1
        assert patience.count >= 2


# --- streams that broke after they started ----------------------------------------------------------------------


def _one_token_then_hang_up(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Content-Length", "100000")  # promise more than is sent: the connection breaks mid-body
    handler.end_headers()
    handler.wfile.write(b'event: token\ndata: {"text": "Hel"}\n\n')
    handler.wfile.flush()
    handler.close_connection = True


def _one_token_then_silence(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    event = b'event: token\ndata: {"text": "Hel"}\n\n'
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
    handler.wfile.flush()
    time.sleep(1.5)  # longer than the client's read timeout


@pytest.mark.parametrize("server_side", [_one_token_then_hang_up, _one_token_then_silence])
def test_a_stream_that_fails_after_it_started_is_never_retried(server_side: Handler) -> None:
    attempts = Attempts()
    with (
        stub_server(server_side) as stub,
        SmolLMClient(stub.url, timeout=(1.0, 0.3), retry=quick_policy(attempts)) as client,
    ):
        chunks = client.stream("Hi")
        assert next(chunks) == "Hel"
        with pytest.raises(StreamError, match="after 1 chunks"):
            next(chunks)
        assert chunks.text == "Hel"
    assert attempts.count == 1
    assert len(stub.requests) == 1


def test_an_error_event_ends_the_stream_with_its_type() -> None:
    body = (
        b'event: token\ndata: {"text": "a"}\n\n'
        b'event: error\ndata: {"error": {"type": "generation_error", "message": "boom"}}\n\n'
    )
    with (
        stub_server(lambda h: send(h, 200, body, "text/event-stream")) as stub,
        SmolLMClient(stub.url) as client,
        client.stream("Hi") as chunks,
    ):
        assert next(chunks) == "a"
        with pytest.raises(StreamError, match="boom") as caught:
            next(chunks)
        assert caught.value.error_type == "generation_error"


# --- pure parts ---------------------------------------------------------------------------------------------------


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") == 0.0
    in_ten_s = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (parse_retry_after(in_ten_s) or 0) <= 10


def test_only_transient_failures_are_retryable() -> None:
    assert is_retryable(ServiceUnreachableError("refused"))
    assert is_retryable(ServiceUnavailableError("busy", retry_after=3, error_type="queue_full"))
    assert is_retryable(ServiceUnavailableError("loading", state="loading"))
    assert not is_retryable(ServiceUnavailableError("broken", state="error"))
    assert not is_retryable(ServiceUnavailableError("off", state="disabled"))
    assert not is_retryable(ResponseTimeoutError("slow"))
    assert not is_retryable(StreamError("broke"))
    assert not is_retryable(BadRequestError("bad", status_code=400))


def test_backoff_grows_with_jitter_and_stays_capped() -> None:
    policy = RetryPolicy(initial_wait_s=0.5, max_wait_s=4.0, jitter_s=0.5, retry_after_cap_s=10.0)
    waits = []
    for attempt in range(1, 8):
        state = tenacity.RetryCallState(policy.retrying(), None, (), {})
        state.attempt_number = attempt
        state.set_exception((ServiceUnreachableError, ServiceUnreachableError("x"), None))
        waits.append(policy.wait_s(state))
    for attempt, wait in enumerate(waits, start=1):
        base = min(0.5 * 2 ** (attempt - 1), 4.0)
        assert base <= wait <= min(base + 0.5, 4.0)
    state.set_exception((ServiceUnavailableError, ServiceUnavailableError("x", retry_after=60), None))
    assert policy.wait_s(state) == 10.0


def test_importing_the_client_and_the_health_check_stays_light() -> None:
    code = (
        "import innova_smollm.ops.client, innova_smollm.ops.healthcheck, sys; "
        "heavy = sorted(m for m in sys.modules if m.startswith(('litestar', 'llama_cpp', 'msgspec', 'uvicorn'))); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert done.returncode == 0, done.stderr


def test_an_answer_that_is_not_json_is_unexpected() -> None:
    with (
        stub_server(lambda h: send(h, 200, b"<html>hello</html>", "text/html")) as stub,
        SmolLMClient(stub.url) as client,
        pytest.raises(UnexpectedResponseError, match="not JSON"),
    ):
        client.info()


def test_response_format_comes_back_parsed(live: LiveServer) -> None:
    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        legs: int

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    with SmolLMClient(live.url) as client:
        pet = client.chat("Describe a pet.", response_format=Pet, max_tokens=40, temperature=0)
        assert pet.finish_reason == "stop" and isinstance(pet.parsed, Pet)
        answer = client.generate("Is it OK? JSON: ", response_format=schema, max_tokens=20, temperature=0)
        assert answer.parsed == json.loads(answer.text) and isinstance(answer.parsed["ok"], bool)
        plain = client.chat("Hi", response_format={"type": "json_object"}, max_tokens=30, temperature=0)
        assert plain.finish_reason != "stop" or isinstance(plain.parsed, dict)
        with pytest.raises(BadRequestError) as caught:
            client.chat("Hi", response_format={"type": "string", "pattern": "^a"}, max_tokens=4)
        assert caught.value.field == "response_format.json_schema.schema"


def test_tools_come_back_as_parsed_calls_and_a_tool_loop_goes_round(live: LiveServer) -> None:
    tools = EXAMPLE_TOOLS
    history: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    with SmolLMClient(live.url) as client:
        answer = client.chat(history, tools=tools, tool_choice="get_weather", max_tokens=60, temperature=0)
        assert answer.finish_reason == "tool_calls" and answer.text == ""
        (call,) = answer.tool_calls
        assert call.name == "get_weather" and call.id.startswith("call_")
        assert isinstance(call.arguments["city"], str) and call.arguments["unit"] in ("celsius", "fahrenheit")
        assert answer.usage.completion_tokens > 0 and answer.model_info["model_name"]

        required = client.chat(history, tools=tools, tool_choice="required", max_tokens=60, temperature=0)
        assert required.finish_reason == "tool_calls" and required.tool_calls[0].name in ("get_weather", "send_email")

        history += [answer.assistant_message(), {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
        assert history[1]["tool_calls"][0]["function"]["arguments"] == json.dumps(call.arguments)
        final = client.chat(history, tools=tools, tool_choice="none", max_tokens=16, temperature=0)
        assert final.text and not final.tool_calls and final.finish_reason in ("stop", "length")


def test_a_tool_request_that_cannot_be_honoured_names_the_field(live: LiveServer) -> None:
    attempts = Attempts()
    with SmolLMClient(live.url, retry=quick_policy(attempts)) as client, pytest.raises(BadRequestError) as caught:
        client.chat("Hi", tools=EXAMPLE_TOOLS[:1], tool_choice="no_such_tool", max_tokens=4)
    assert caught.value.status_code == 400 and caught.value.field == "tool_choice"
    assert attempts.count == 1
