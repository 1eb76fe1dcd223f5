"""The in-process API (get_smollm_model) and the innova-smollm command, with the real model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from uvicorn.config import STARTUP_FAILURE

import innova_smollm.inprocess as inprocess
from innova_smollm import get_smollm_model
from innova_smollm.errors import InvalidRequestError
from tests.servers import API, REPO_ROOT, run_service, wait_until

CHAT_KEYS = {"response", "model_info", "usage", "finish_reason", "timings"}


@pytest.fixture
def fresh_model(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    monkeypatch.setenv("SMOLLM_MODEL_PATH", str(model_path))
    monkeypatch.setenv("SMOLLM_N_CTX", "1024")
    monkeypatch.setattr(inprocess, "_model", None)


def test_in_process_chat_has_the_http_answer_shape(fresh_model: None) -> None:
    model = get_smollm_model()
    try:
        answer = model.chat_completion(messages=[{"role": "user", "content": "Bonjour"}], max_tokens=16)
        assert set(answer) == CHAT_KEYS
        assert answer["response"].strip()
        assert answer["model_info"]["parameters"] == 134_515_008
        assert answer["model_info"]["provider"] == "local"
        assert answer["usage"]["completion_tokens"] <= 16
        generated = model.generate("1, 2, 3,", max_tokens=4, temperature=0)
        assert generated["text"].strip().startswith("4")
        with pytest.raises(InvalidRequestError, match="role"):
            model.chat_completion(messages=[{"role": "robot", "content": "x"}])
    finally:
        model.close()


def test_the_model_loads_once_for_concurrent_callers(fresh_model: None) -> None:
    seen: list[object] = []
    answers: list[str] = []

    def call() -> None:
        model = get_smollm_model()
        seen.append(model)
        answers.append(model.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)["finish_reason"])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert len(seen) == 4 and all(model is seen[0] for model in seen)
        assert len(answers) == 4
    finally:
        get_smollm_model().close()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "innova_smollm", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def test_check_model_accepts_a_real_gguf(model_path: Path) -> None:
    result = cli("check-model", str(model_path), "--json")
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["parameters"] == 134_515_008
    assert meta["architecture"] == "llama"
    assert meta["quantization"] == "Q4_1"


@pytest.mark.parametrize("kind", ["missing", "truncated", "not-gguf", "corrupt"])
def test_check_model_rejects_broken_files_with_one_line(tmp_path: Path, model_path: Path, kind: str) -> None:
    target = tmp_path / f"{kind}.gguf"
    data = model_path.read_bytes()
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 3])
    elif kind == "not-gguf":
        target.write_bytes(b"<!doctype html><title>404</title>" * 100)
    elif kind == "corrupt":
        target.write_bytes(data[:64] + os.urandom(4096))
    result = cli("check-model", str(target))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("check-model: FAILED:")
    assert str(target) in lines[0]


def test_chat_command_prints_the_streamed_answer(model_path: Path) -> None:
    result = cli("chat", "Say hello.", "--max-tokens", "12", env={"SMOLLM_MODEL_PATH": str(model_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_serve_refuses_bad_settings_with_the_variable_named() -> None:
    result = cli("serve", env={"SMOLLM_N_CTX": "lots"})
    assert result.returncode == 2
    assert "SMOLLM_N_CTX" in result.stderr


@pytest.mark.parametrize("missing", ["uvicorn", "litestar"])
def test_serve_without_the_server_extra_says_which_extra_to_install(missing: str) -> None:
    # A bare `pip install innova-smollm` has neither: the module is made unimportable, as it is there.
    code = f"import sys; sys.modules[{missing!r}] = None; from innova_smollm.cli import main; sys.exit(main(['serve']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert missing in lines[0] and "innova-smollm[server]" in lines[0]


def test_serve_refuses_a_public_address_without_keys() -> None:
    result = cli("serve", env={"HOST": "0.0.0.0", "SMOLLM_API_KEYS": ""})
    assert result.returncode == 2
    assert "SMOLLM_API_KEYS" in result.stderr


def test_serve_exits_non_zero_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", env={"PORT": str(port), "SMOLLM_MODEL_PATH": str(tmp_path / "none.gguf")})
    assert result.returncode == STARTUP_FAILURE, result.stderr
    assert "address already in use" in result.stderr.lower()


def test_serve_stays_up_without_its_model_and_says_why_on_health(tmp_path: Path) -> None:
    missing = tmp_path / "Llama-3.2-3B-Instruct-Q4_K_M.gguf"
    with run_service({"SMOLLM_MODEL_PATH": str(missing)}) as service:
        import requests

        def status() -> dict[str, str]:
            return dict(requests.get(f"{service.url}{API}/health", timeout=5).json())

        assert wait_until(lambda: status()["status"] == "error", timeout=30)
        assert str(missing) in status()["detail"]
        assert service.process.poll() is None  # still up: systemd does not crash-loop


def test_serve_answers_the_seed_payload(model_path: Path) -> None:
    import requests

    with run_service({"SMOLLM_MODEL_PATH": str(model_path)}) as service:
        assert wait_until(lambda: requests.get(f"{service.url}{API}/health", timeout=5).status_code == 200, timeout=60)
        reply = requests.post(
            f"{service.url}{API}/chat",
            json={
                "messages": [{"role": "user", "content": "Bonjour, que peux-tu faire pour KORYXA ?"}],
                "max_tokens": 32,
                "temperature": 0.7,
            },
            timeout=120,
        )
        assert reply.status_code == 200
        assert reply.json()["response"].strip()
        logs = service.output()
    # Logs are JSON lines, and the prompt text is not in them by default.
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(record.get("event") == "model_loaded" for record in records)
    assert "KORYXA" not in logs
