"""API keys: every route but health needs a bearer key when SMOLLM_API_KEYS is set; no keys, no wide listening."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.http.auth import bearer_token, key_matches
from tests.servers import API, REPO_ROOT, LiveServer, make_settings, serve_in_thread

KEYS = ("first-key-0123456789abcdef", "second-key-fedcba9876543210")
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded(engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    with serve_in_thread(make_settings(model_path, api_keys=KEYS), engine=engine) as server:
        yield server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_health_needs_no_key(guarded: LiveServer, method: str) -> None:
    reply = guarded.get(f"{API}/health") if method == "GET" else guarded.post(f"{API}/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"{API}/chat"),
        ("POST", f"{API}/generate"),
        ("GET", f"{API}/info"),
        ("POST", "/innova/api/chatlaya/message"),
        ("GET", "/metrics"),
        ("GET", "/schema/openapi.json"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-configured-key-at-all"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {KEYS[0]}x"},
    ],
    ids=["none", "wrong", "basic", "empty", "longer"],
)
def test_every_other_route_refuses_without_a_valid_key(
    guarded: LiveServer, method: str, path: str, headers: dict[str, str]
) -> None:
    reply = guarded.post(path, json=CHAT, headers=headers) if method == "POST" else guarded.get(path, headers=headers)
    assert reply.status_code == 401, reply.text
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["type"] == "authentication_error"
    assert "Authorization" in error["message"] or "API key" in error["message"]
    assert KEYS[0] not in reply.text


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_is_accepted(guarded: LiveServer, key: str) -> None:
    assert guarded.post(f"{API}/chat", json=CHAT, headers=bearer(key)).status_code == 200
    assert guarded.get(f"{API}/info", headers=bearer(key)).status_code == 200
    assert guarded.get("/metrics", headers=bearer(key)).status_code == 200
    schema = guarded.get("/schema/openapi.json", headers=bearer(key)).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_openai_sdk_sends_its_key_and_gets_openai_shaped_401s(guarded: LiveServer) -> None:
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEYS[1], max_retries=0) as sdk:
        assert sdk.models.list().data
        answer = sdk.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert answer.choices[0].message.content is not None
    wrong = openai.OpenAI(base_url=guarded.url + "/v1", api_key="a-key-that-is-not-configured", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "authentication_error"


def test_refusals_are_counted_and_keys_never_logged(guarded: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guarded.get(f"{API}/info", headers={"Authorization": "Bearer wrong-key-but-long-enough"})
    guarded.get(f"{API}/info", headers=bearer(KEYS[0]))
    metrics = guarded.get("/metrics", headers=bearer(KEYS[0])).text
    assert 'smollm_rejections_total{reason="unauthorized"}' in metrics
    assert all(KEYS[0] not in record.getMessage() and KEYS[0] not in str(record.__dict__) for record in caplog.records)


def test_key_matching_checks_every_key() -> None:
    expected = tuple(key.encode() for key in KEYS)
    assert key_matches(KEYS[1].encode(), expected)
    assert not key_matches(KEYS[0][:-1].encode(), expected)
    assert not key_matches(b"", expected)
    assert not key_matches("clé-non-ascii-0123456789".encode(), expected)
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


def serve_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Start ``innova-smollm serve`` and return how it ended; only for settings that must refuse to start."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SMOLLM_", "HOST", "PORT"))}
    return subprocess.run(
        [sys.executable, "-m", "innova_smollm", "serve"],
        env={**clean, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serve_refuses_to_listen_beyond_loopback_without_keys() -> None:
    done = serve_exit({"HOST": "0.0.0.0"})
    assert done.returncode != 0
    assert "HOST='0.0.0.0' listens beyond loopback but SMOLLM_API_KEYS is empty" in done.stderr
    assert "SMOLLM_ALLOW_INSECURE_LISTEN=true" in done.stderr


def test_serve_refuses_short_keys_without_echoing_them() -> None:
    done = serve_exit({"SMOLLM_API_KEYS": "short-secret"})
    assert done.returncode != 0
    assert "SMOLLM_API_KEYS: every key must be at least 16 characters long" in done.stderr
    assert "short-secret" not in done.stderr + done.stdout
