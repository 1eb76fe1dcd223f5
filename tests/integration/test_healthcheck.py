"""``innova-smollm-healthcheck`` against the real service, nothing listening, 503-answering services and a wedged
engine; its exit codes, its retry counts, and the restart policy.

OK and CRITICAL go through the installed console script (a subprocess, as cron runs it); the other cases call
``main()`` in-process, which is the same code without the start-up cost.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from innova_smollm.core.types import Engine, GenerationJob, TokenSink
from innova_smollm.ops.healthcheck import FailureRecord, Status, main, next_record
from tests.integration.test_client import SharedEngine, busy_service, failed_service, loading_service, send, stub_server
from tests.servers import LiveServer, free_port, make_settings, serve_in_thread

SCRIPT = Path(sys.executable).parent / "innova-smollm-healthcheck"
MODEL = "SmolLM2-135M-Instruct.Q4_1"
#: Waits shrunk for tests: the policy still honours Retry-After, capped at this.
QUICK = ["--max-wait", "0.05"]


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False, env=env)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


def nothing_listening() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --- through the console script ---------------------------------------------------------------------------------


def test_script_says_ok_in_one_line_when_the_model_serves(live: LiveServer) -> None:
    done = run_script("--url", live.url)
    assert done.returncode == 0, done
    assert re.fullmatch(rf"OK - model {re.escape(MODEL)} ready \(\d+ ms\)\n", done.stdout)
    assert done.stderr == ""


def test_script_deep_probe_generates_within_the_deadline(live: LiveServer) -> None:
    done = run_script("--url", live.url, "--deep", "--deadline", "30", "--json")
    assert done.returncode == 0, done
    result = json.loads(done.stdout)
    assert result["status"] == "OK"
    assert result["exit_code"] == 0
    assert result["model"] == MODEL
    assert 0 < result["probe_ms"] < 30_000
    assert result["attempts"] == 2  # one readiness check, one probe: nothing needed a retry
    assert "deep probe answered 1 token" in result["message"]


def test_script_says_critical_when_nothing_listens_after_bounded_retries() -> None:
    url = nothing_listening()
    started = time.monotonic()
    done = run_script("--url", url, "--max-time", "1", *QUICK)
    assert done.returncode == 2, done
    assert re.fullmatch(
        rf"CRITICAL - cannot connect to {re.escape(url)}: connection refused \(\d+ attempts in 1\.\d s\)\n", done.stdout
    )
    attempts = int(re.search(r"\((\d+) attempts", done.stdout).group(1))  # type: ignore[union-attr]
    assert attempts >= 5  # 1 s of retries with 0.05 s pauses
    assert time.monotonic() - started < 10  # --max-time 1, plus the interpreter's start-up


def test_script_help_documents_the_exit_codes() -> None:
    done = run_script("--help")
    assert done.returncode == 0
    for line in ("0 OK", "1 WARNING", "2 CRITICAL", "3 UNKNOWN", "--restart-after", "systemd-cat"):
        assert line in done.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--bogus"], "unrecognized arguments"),
        (["--max-time", "-1"], "positive"),
        (["--deep", "--deadline", "40", "--max-time", "30"], "--deadline must not exceed --max-time"),
        (["--restart-after", "3"], "needs --state-file"),
    ],
)
def test_script_bad_arguments_are_unknown(args: list[str], complaint: str) -> None:
    done = run_script(*args)
    assert done.returncode == 3
    assert done.stdout.startswith("UNKNOWN - bad arguments")
    assert complaint in done.stdout


# --- 503 services, in-process ------------------------------------------------------------------------------------


def test_loading_until_max_time_is_warning(
    engine: Engine, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with loading_service(engine, model_path) as (server, _):
        code, result = run_main(capsys, "--url", server.url, "--max-time", "1", *QUICK)
    assert code == Status.WARNING
    assert result["state"] == "loading"
    assert "model not serving (loading)" in result["message"]
    # Retry-After: 5 capped at 0.05 s: about 20 attempts in 1 s (a slow CI box gets fewer).
    assert result["attempts"] >= 5
    assert result["elapsed_ms"] < 1500


def test_loading_that_finishes_within_max_time_is_ok(
    engine: Engine, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with loading_service(engine, model_path) as (server, gate):
        threading.Timer(0.5, gate.set).start()
        code, result = run_main(capsys, "--url", server.url, "--max-time", "20", *QUICK)
    assert code == Status.OK, result
    assert result["attempts"] >= 2
    assert result["model"] == MODEL


def test_a_model_that_failed_to_load_is_critical_at_once(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with failed_service(model_path) as server:
        code, result = run_main(capsys, "--url", server.url, "--max-time", "20", *QUICK)
    assert code == Status.CRITICAL
    assert result["state"] == "error"
    assert "not a GGUF file" in result["message"]
    assert result["attempts"] == 1  # waiting does not fix a broken model file


def test_a_disabled_service_is_critical(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve_in_thread(make_settings(model_path, enabled=False)) as server:
        code, result = run_main(capsys, "--url", server.url, *QUICK)
    assert code == Status.CRITICAL
    assert result["state"] == "disabled"


def test_deep_probe_on_a_full_queue_is_warning(
    engine: Engine, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with busy_service(engine, model_path) as (server, _):
        code, result = run_main(capsys, "--url", server.url, "--deep", "--deadline", "1", "--max-time", "1", *QUICK)
    assert code == Status.WARNING
    assert "deep probe: model not serving (queue_full)" in result["message"]
    assert result["attempts"] >= 3  # readiness once, then the probe retried until --max-time


# --- a wedged engine: health says ok, only the deep probe notices -------------------------------------------------


class WedgedEngine(SharedEngine):
    """Takes jobs and starts them, then never produces a token: a stuck decode loop."""

    def submit(self, job: GenerationJob, sink: TokenSink) -> None:
        sink.started()


@pytest.fixture
def wedged(engine: Engine, model_path: Path) -> Iterator[LiveServer]:
    settings = make_settings(model_path, drain_timeout_s=1.0, request_timeout_s=30.0)
    with serve_in_thread(settings, engine=WedgedEngine(engine)) as server:
        yield server


def test_a_wedged_decode_loop_passes_readiness_but_fails_the_deep_probe(
    wedged: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = run_main(capsys, "--url", wedged.url, *QUICK)
    assert code == Status.OK

    started = time.monotonic()
    code, result = run_main(capsys, "--url", wedged.url, "--deep", "--deadline", "1", "--max-time", "5", *QUICK)
    assert code == Status.CRITICAL
    assert result["message"].startswith("deep probe: no answer within 1 s")
    assert result["attempts"] == 2  # a read timeout is not retried
    assert time.monotonic() - started < 3


# --- answers that are not the service's ---------------------------------------------------------------------------


def _not_found(handler: http.server.BaseHTTPRequestHandler) -> None:
    send(handler, 404, b"<html>not here</html>", "text/html")


def _html_ok(handler: http.server.BaseHTTPRequestHandler) -> None:
    send(handler, 200, b"<html>welcome to nginx</html>", "text/html")


@pytest.mark.parametrize("answer", [_not_found, _html_ok])
def test_an_answer_that_is_not_the_service_is_unknown(answer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with stub_server(answer) as stub:
        code, result = run_main(capsys, "--url", stub.url, *QUICK)
    assert code == Status.UNKNOWN, result
    assert result["attempts"] == 1


CHAT_BODY = json.dumps(
    {
        "response": "Hi",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        "model_info": {"model_name": "stub-model"},
        "timings": {"queue_ms": 0.1},
    }
).encode()


def _keyed_service(handler: http.server.BaseHTTPRequestHandler) -> None:
    if handler.path.endswith("/health"):
        send(handler, 200, b'{"status": "ok"}', "application/json")
    elif handler.headers.get("Authorization") != "Bearer stub-key-0123456789":
        send(handler, 401, b'{"error": {"type": "authentication_error", "message": "no key"}}', "application/json")
    else:
        send(handler, 200, CHAT_BODY, "application/json")


def test_the_api_key_comes_from_the_environment_or_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with stub_server(_keyed_service) as stub:
        code, result = run_main(capsys, "--url", stub.url, "--deep", *QUICK)
        assert code == Status.UNKNOWN
        assert "API key was refused (401)" in result["message"]

        code, result = run_main(capsys, "--url", stub.url, "--deep", "--api-key", "stub-key-0123456789", *QUICK)
        assert code == Status.OK, result
        assert result["model"] == "stub-model"

        monkeypatch.setenv("SMOLLM_API_KEY", "stub-key-0123456789")
        code, result = run_main(capsys, "--url", stub.url, "--deep", *QUICK)
        assert code == Status.OK, result


# --- the restart policy ------------------------------------------------------------------------------------------


def test_restart_policy_counts_consecutive_criticals_and_never_loops() -> None:
    record, now = FailureRecord(), 1_000_000.0
    decisions = []
    for status in [Status.CRITICAL, Status.CRITICAL, Status.CRITICAL, Status.CRITICAL, Status.CRITICAL]:
        record, restart = next_record(record, status, now=now, restart_after=3, cooldown_s=600)
        decisions.append(restart)
        now += 60
    assert decisions == [False, False, True, False, False]
    assert record == FailureRecord(consecutive_failures=2, last_restart_at=1_000_120.0)

    # Still failing after the cool-down: one more restart, then quiet again.
    record, restart = next_record(record, Status.CRITICAL, now=1_000_120.0 + 600, restart_after=3, cooldown_s=600)
    assert restart
    assert record.consecutive_failures == 0

    # OK resets the count; WARNING (loading) and UNKNOWN leave it alone.
    record = FailureRecord(consecutive_failures=2)
    assert next_record(record, Status.WARNING, now=now, restart_after=3, cooldown_s=600) == (record, False)
    assert next_record(record, Status.UNKNOWN, now=now, restart_after=3, cooldown_s=600) == (record, False)
    assert next_record(record, Status.OK, now=now, restart_after=3, cooldown_s=600) == (FailureRecord(), False)
    # Off (0): counts, never restarts.
    assert next_record(record, Status.CRITICAL, now=now, restart_after=0, cooldown_s=0) == (
        FailureRecord(consecutive_failures=3),
        False,
    )


def test_the_restart_command_runs_once_after_n_failures_then_waits_for_the_cooldown(
    tmp_path: Path, live: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state, restarts = tmp_path / "state" / "health.json", tmp_path / "restarts.log"
    policy = [
        "--state-file",
        str(state),
        "--restart-after",
        "2",
        "--restart-command",
        f"sh -c 'echo restarted >> {restarts}'",
    ]
    down = ["--url", nothing_listening(), "--max-time", "0.2", *QUICK, *policy]

    outcomes = [run_main(capsys, *down) for _ in range(4)]
    assert [code for code, _ in outcomes] == [Status.CRITICAL] * 4
    assert [r["restarted"] for _, r in outcomes] == [False, True, False, False]
    assert [r["consecutive_failures"] for _, r in outcomes] == [1, 0, 1, 2]
    assert "2 consecutive failures, ran `sh -c" in outcomes[1][1]["message"]
    assert restarts.read_text().splitlines() == ["restarted"]  # once, though every later run failed too

    # Once the cool-down has passed, the next failure restarts again.
    record = json.loads(state.read_text())
    state.write_text(json.dumps({**record, "last_restart_at": time.time() - 901}))
    code, result = run_main(capsys, *down)
    assert result["restarted"]
    assert restarts.read_text().splitlines() == ["restarted", "restarted"]

    # An OK run resets the count.
    run_main(capsys, *down)
    code, result = run_main(capsys, "--url", live.url, *policy)
    assert code == Status.OK
    assert result["consecutive_failures"] == 0


def test_an_unreadable_state_file_starts_a_fresh_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "health.json"
    state.write_text("{not json")
    code, result = run_main(
        capsys, "--url", nothing_listening(), "--max-time", "0.2", *QUICK, "--state-file", str(state)
    )
    assert code == Status.CRITICAL
    assert result["consecutive_failures"] == 1
    assert json.loads(state.read_text())["consecutive_failures"] == 1
