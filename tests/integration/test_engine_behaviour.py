"""Admission, cancellation, loading and provider behaviour, with the real engine behind real uvicorn."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from innova_smollm.core.service import ModelService, Outcome, RequestOptions
from innova_smollm.core.sinks import BlockingSink, inbox_of
from innova_smollm.core.types import Engine, GenerationJob
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.settings import Fallback, Provider, Settings
from tests.servers import API, LONG_PROMPT, LiveServer, make_settings, serve_in_thread, wait_until

COUNT_FOREVER = {"prompt": LONG_PROMPT, "max_tokens": 900, "temperature": 0}


def in_flight(server: LiveServer) -> int:
    return int(server.get(f"{API}/info").json()["in_flight"])


class OpenStream:
    """A streamed answer read a few events at a time; it stays connected until closed."""

    def __init__(self, server: LiveServer, body: dict[str, object]) -> None:
        self.reply = requests.post(
            f"{server.url}{API}/generate", json={**body, "stream": True}, stream=True, timeout=60
        )
        assert self.reply.status_code == 200, self.reply.text
        # One iterator for the whole life of the stream: a dropped iterator closes the connection.
        self._lines = self.reply.iter_lines(decode_unicode=True)

    def next_events(self, count: int) -> list[str]:
        seen = []
        for line in self._lines:
            if line.startswith("data: "):
                seen.append(line)
                if len(seen) == count:
                    break
        return seen

    def rest(self) -> str:
        return "\n".join(self._lines)

    def close(self) -> None:
        self.reply.close()


@pytest.fixture(scope="module")
def one_sequence_engine(model_path: Path) -> Iterator[GGUFEngine]:
    # Admission only counts; the engine's sequences decide what runs together. With the shared four-sequence engine
    # a "waiting" request would run at once and be gone before the test saw it waiting.
    loaded = GGUFEngine(make_settings(model_path, parallel=1))
    yield loaded
    loaded.close()


@pytest.fixture
def small_queue(one_sequence_engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    # One sequence and one place in line, so a second request waits and a third is refused.
    settings = make_settings(model_path, parallel=1, max_queue=1, max_tokens=1000)
    with serve_in_thread(settings, engine=one_sequence_engine) as server:
        yield server


def test_queue_full_answers_503_with_retry_after_and_spares_running_requests(small_queue: LiveServer) -> None:
    running = OpenStream(small_queue, COUNT_FOREVER)
    running.next_events(2)  # generating now
    waiting = threading.Thread(
        target=lambda: requests.post(
            f"{small_queue.url}{API}/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=120
        ),
        daemon=True,
    )
    waiting.start()
    assert wait_until(lambda: in_flight(small_queue) == 2, timeout=10)
    rejected = small_queue.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert rejected.status_code == 503
    assert int(rejected.headers["Retry-After"]) >= 1
    error = rejected.json()["error"]
    assert error["type"] == "queue_full"
    assert "SMOLLM_MAX_QUEUE=1" in error["message"]
    # The running stream was not interrupted by the waiting or the rejected request: it carries on.
    more = running.next_events(5)
    assert len(more) == 5 and all('"text"' in line for line in more)
    running.close()
    waiting.join(timeout=120)
    assert wait_until(lambda: in_flight(small_queue) == 0, timeout=30)


def assert_cancelled_within_a_few_tokens(engine: GGUFEngine, seen: int) -> None:
    """The dead job ended as cancelled, a few tokens after the client left, not at its max_tokens of 900."""
    assert wait_until(lambda: engine.last_finish is not None and engine.last_finish.reason == "cancelled", timeout=30)
    assert engine.last_finish is not None
    assert engine.last_finish.completion_tokens < seen + 20, engine.last_finish


def test_a_dropped_stream_frees_the_engine_at_once(small_queue: LiveServer, one_sequence_engine: GGUFEngine) -> None:
    reply = OpenStream(small_queue, COUNT_FOREVER)
    reply.next_events(3)
    reply.close()  # the client goes away mid-generation
    assert wait_until(lambda: in_flight(small_queue) == 0, timeout=10)
    assert_cancelled_within_a_few_tokens(one_sequence_engine, seen=3)
    answer = small_queue.post(f"{API}/generate", json={"prompt": "Hello", "max_tokens": 3}).json()
    assert answer["usage"]["completion_tokens"] >= 1


def test_a_dropped_plain_request_frees_the_engine_at_once(
    small_queue: LiveServer, one_sequence_engine: GGUFEngine
) -> None:
    body = json.dumps(COUNT_FOREVER).encode()
    host, port = small_queue.address
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            f"POST {API}/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: in_flight(small_queue) == 1, timeout=10)
        time.sleep(0.5)  # let it generate for a while
        started = one_sequence_engine.last_finish
    assert wait_until(lambda: in_flight(small_queue) == 0, timeout=10)
    assert wait_until(lambda: one_sequence_engine.last_finish is not started, timeout=30)
    assert one_sequence_engine.last_finish is not None
    assert one_sequence_engine.last_finish.reason == "cancelled"
    assert one_sequence_engine.last_finish.completion_tokens < 800
    answer = small_queue.post(f"{API}/generate", json={"prompt": "Hello", "max_tokens": 3}).json()
    assert answer["usage"]["completion_tokens"] >= 1


def test_requests_in_line_are_served_in_order_without_mixing_answers(small_queue: LiveServer) -> None:
    prompts = ["Count from 1 to 1000: 1, 2, 3,", "The alphabet: A, B, C,"]
    results: dict[str, str] = {}

    def ask(prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        results[prompt] = small_queue.post(f"{API}/generate", json=body).json()["text"]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    alone = {
        p: small_queue.post(f"{API}/generate", json={"prompt": p, "max_tokens": 12, "temperature": 0}).json()["text"]
        for p in prompts
    }
    assert results == alone


class GatedLoader:
    """The real loader, held back until the test opens the gate (to observe the `loading` state)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, settings: Settings) -> Engine:
        self.gate.wait(timeout=60)
        return GGUFEngine(settings)


def test_health_is_503_loading_until_the_model_is_ready(model_path: Path) -> None:
    loader = GatedLoader()
    with serve_in_thread(make_settings(model_path), loader=loader) as server:
        loading = server.get(f"{API}/health")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        assert loading.headers["Retry-After"] == "5"
        chat = server.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert chat.json()["error"]["type"] == "not_ready"
        assert server.get(f"{API}/info").json()["state"] == "loading"
        loader.gate.set()
        assert wait_until(lambda: server.get(f"{API}/health").status_code == 200, timeout=60)
        assert server.get(f"{API}/health").json() == {"status": "ok"}


def test_a_missing_model_keeps_the_service_up_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "other-model.gguf").write_bytes(b"GGUF")
    settings = make_settings(tmp_path / "missing.gguf")
    with serve_in_thread(settings, loader=None) as server:
        assert wait_until(lambda: server.get(f"{API}/health").json()["status"] == "error", timeout=30)
        health = server.get(f"{API}/health")
        assert health.status_code == 503
        detail = health.json()["detail"]
        assert str(tmp_path / "missing.gguf") in detail
        assert "other-model.gguf" in detail  # what the directory holds
        chat = server.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert "missing.gguf" in chat.json()["error"]["message"]


def test_not_a_gguf_file_is_reported_on_health(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"<html>not found</html>")
    with serve_in_thread(make_settings(bogus)) as server:
        assert wait_until(lambda: server.get(f"{API}/health").json()["status"] == "error", timeout=30)
        assert "not a GGUF file" in server.get(f"{API}/health").json()["detail"]


def test_echo_fallback_answers_when_the_model_failed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "gone.gguf", fallback=Fallback.ECHO)
    with serve_in_thread(settings) as server:
        assert wait_until(lambda: server.get(f"{API}/health").json()["status"] == "error", timeout=30)
        reply = server.post(
            f"{API}/chat",
            json={"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ping?"}]},
        )
        assert reply.status_code == 200
        body = reply.json()
        assert body["response"] == "Ping?"
        assert body["model_info"]["provider"] == "echo-fallback"
        assert "gone.gguf" in body["model_info"]["fallback_reason"]
        # Health stays honest: the model is not loaded, whatever the fallback answers.
        assert server.get(f"{API}/health").status_code == 503


def test_echo_provider_answers_without_a_model(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "unused.gguf", provider=Provider.ECHO)
    with serve_in_thread(settings) as server:
        assert server.get(f"{API}/health").json() == {"status": "ok"}
        body = server.post(
            f"{API}/chat", json={"messages": [{"role": "user", "content": "Bonjour KORYXA"}], "max_tokens": 8}
        ).json()
        assert body["response"] == "Bonjour KORYXA"
        assert body["model_info"]["provider"] == "echo"
        assert body["model_info"]["model_name"] == "echo"
        stream = server.post("/innova/api/chatlaya/message", json={"messages": [{"role": "user", "content": "Yo"}]})
        assert '"text":"Yo"' in stream.text and "event: done" in stream.text


def test_disabled_service_answers_503_disabled(model_path: Path) -> None:
    with serve_in_thread(make_settings(model_path, enabled=False)) as server:
        health = server.get(f"{API}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "disabled"
        chat = server.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert chat.json()["error"]["type"] == "not_ready"
        assert "disabled" in chat.json()["error"]["message"]


class HoldingSink(BlockingSink):
    """A job's sink that keeps the engine thread inside started() until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def started(self) -> None:
        self.holding.set()
        self.release.wait(timeout=60)
        super().started()


def test_a_request_waiting_past_its_timeout_gets_503(engine: GGUFEngine, model_path: Path) -> None:
    settings = make_settings(model_path, request_timeout_s=1.0, max_queue=2)
    with serve_in_thread(settings, engine=engine) as server:
        # Keep the engine busy, however fast it decodes: another client's job holds the engine thread in its
        # started() callback until the test releases it.
        busy = HoldingSink()
        engine.submit(GenerationJob(prompt_tokens=tuple(engine.tokenize(LONG_PROMPT)), max_tokens=900), busy)
        assert busy.holding.wait(timeout=30)
        try:
            waited = server.post(f"{API}/generate", json={"prompt": "Hi", "max_tokens": 2})
            assert waited.status_code == 503
            assert waited.json()["error"]["type"] == "timeout"
            assert "SMOLLM_REQUEST_TIMEOUT_S=1" in waited.json()["error"]["message"]
            assert waited.headers["Retry-After"]
        finally:
            busy.cancel()
            busy.release.set()
        assert wait_until(lambda: in_flight(server) == 0, timeout=30)


def test_generation_stops_at_the_request_deadline(engine: GGUFEngine, model_path: Path) -> None:
    with serve_in_thread(make_settings(model_path, request_timeout_s=1.0), engine=engine) as server:
        answer = server.post(f"{API}/generate", json={**COUNT_FOREVER, "max_tokens": 900}).json()
        assert answer["finish_reason"] == "timeout"
        assert 0 < answer["usage"]["completion_tokens"] < 900
        assert answer["text"].strip().startswith("5")


def test_long_token_pieces_keep_their_text(engine: GGUFEngine) -> None:
    # SmolLM2 has tokens longer than Llama.detokenize's 32-byte buffer (a run of 64 dashes is one token).
    dashes = "-" * 64
    tokens = engine.tokenize("a" + dashes + "b")
    pieces = [engine.pieces(token)[0] for token in tokens]
    assert max(len(piece) for piece in pieces) == 64
    assert b"".join(pieces).decode().endswith("a" + dashes + "b")


def test_info_names_the_deployed_model_behind_current_gguf_and_shows_the_record(
    tmp_path: Path, model_path: Path
) -> None:
    # The innova_model role's layout: a versioned file, current.gguf pointing at it, and the JSON record.
    versioned = tmp_path / "SmolLM2-135M-Instruct.Q4_1-b179c9523d0e.gguf"
    versioned.symlink_to(model_path)
    (tmp_path / "current.gguf").symlink_to(versioned.name)
    record = {"current": {"name": "SmolLM2-135M-Instruct.Q4_1", "sha256": "b179c952", "time": "2026-11-25T02:00Z"}}
    manifest = tmp_path / "innova_model.fact"
    manifest.write_text(json.dumps(record))
    settings = make_settings(tmp_path / "current.gguf", model_manifest=manifest)
    with serve_in_thread(settings) as server:
        assert wait_until(lambda: server.get(f"{API}/health").status_code == 200, timeout=60)
        info = server.get(f"{API}/info").json()
        assert info["model_name"] == "SmolLM2-135M-Instruct.Q4_1"
        assert info["deployment"] == record
        chat = server.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.json()["model_info"]["model_name"] == "SmolLM2-135M-Instruct.Q4_1"
        manifest.write_text("{broken")
        assert "cannot read" in server.get(f"{API}/info").json()["deployment"]["error"]


def test_a_whole_answer_wakes_the_event_loop_a_few_times_and_a_streamed_one_per_token(
    engine: GGUFEngine, model_path: Path
) -> None:
    service = ModelService(make_settings(model_path), engine=engine)

    async def answer(live_text: bool) -> tuple[list[str], Outcome, int]:
        prepared = service.prepare_generate("Once upon a time", RequestOptions(max_tokens=24, temperature=0))
        chunks: list[str] = []
        async for item in service.open_stream(prepared, live_text=live_text):
            if isinstance(item, Outcome):
                return chunks, item, inbox_of(asyncio.get_running_loop()).wakeups
            chunks.append(item.text)
        raise AssertionError("the stream ended without an outcome")

    whole_chunks, whole, whole_wakeups = asyncio.run(answer(live_text=False))
    streamed_chunks, streamed, streamed_wakeups = asyncio.run(answer(live_text=True))
    assert whole.completion_tokens == streamed.completion_tokens == 24
    assert whole_chunks == [whole.text] and len(streamed_chunks) >= 12
    assert whole_wakeups <= 3 < 12 <= streamed_wakeups
    # The held text still dates the first token from when the engine made it, not from when the answer ended.
    assert whole.first_token_s is not None and whole.first_token_s < whole.total_s / 2
