"""``innova-smollm-healthcheck``: is the model serving? For cron, monitoring (Nagios exit codes) and operators.

It prints one line on stdout (or one JSON object with ``--json``) and exits with the status. Only ``requests``,
``tenacity`` and the standard library are imported, so it runs from the bare package on any host.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import tenacity

from innova_smollm.ops.client import (
    DEFAULT_BASE_URL,
    NO_RETRY,
    AuthenticationFailedError,
    BadRequestError,
    Completion,
    ResponseTimeoutError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    ServiceUnreachableError,
    SmolLMClient,
    SmolLMClientError,
    Timeout,
)

log = logging.getLogger("innova_smollm.ops.healthcheck")

DEFAULT_RESTART_COMMAND = "systemctl restart innovaplus-backend.service"
PROBE_MESSAGES = [{"role": "user", "content": "ping"}]

T = TypeVar("T")


class Status(IntEnum):
    """Nagios plugin exit codes."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


EPILOG = """\
exit codes (Nagios plugin convention):
  0 OK        the model is loaded and answers (and, with --deep, generated within --deadline)
  1 WARNING   not ready yet: loading, shutting down, or too busy (503 with queue_full) until --max-time ran out
  2 CRITICAL  down: nothing listening, model in error/disabled state, no answer within the timeouts,
              deep probe failed or slower than --deadline
  3 UNKNOWN   bad arguments, or an answer this check does not understand (wrong URL, API key refused, ...)

Connection errors and 503 answers are retried with capped exponential backoff, honouring Retry-After,
until --max-time has passed; the whole run stays within --max-time.

restart policy (off by default): with --state-file and --restart-after N, the Nth consecutive CRITICAL run
executes --restart-command once; OK resets the count, WARNING and UNKNOWN leave it alone. After a restart
no other restart happens for --restart-cooldown seconds, however many runs fail.

example cron line (every minute, result in the journal):
  * * * * * root innova-smollm-healthcheck --deep 2>&1 | systemd-cat -t innova-smollm-healthcheck
"""


@dataclass(frozen=True, kw_only=True)
class CheckConfig:
    url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    deep: bool = False
    deadline_s: float = 10.0
    max_time_s: float = 30.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0
    max_wait_s: float = 5.0


@dataclass(kw_only=True)
class Result:
    status: Status
    message: str
    url: str
    model: str | None = None
    state: str | None = None
    attempts: int = 0
    elapsed_ms: float = 0.0
    health_ms: float | None = None
    probe_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status.name} - {self.message}"

    def as_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        data.update(status=self.status.name, exit_code=int(self.status), **self.extra)
        return json.dumps(data, separators=(",", ":"))


class Budget:
    """The run's deadline: every attempt's timeouts are cut to what is left of --max-time."""

    def __init__(self, max_time_s: float) -> None:
        self.started = time.monotonic()
        self.end = self.started + max_time_s

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, connect: float, read: float) -> Timeout:
        left = max(0.05, self.remaining())
        return (min(connect, left), min(read, left))

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


class Checker:
    def __init__(self, config: CheckConfig, client: SmolLMClient | None = None) -> None:
        self.config = config
        self.budget = Budget(config.max_time_s)
        self.attempts = 0
        self.policy = RetryPolicy(
            # Time bounds the check, not a count: a model loading for 20 s is worth 20 s of polling.
            max_attempts=1_000_000,
            max_total_s=config.max_time_s,
            initial_wait_s=min(0.25, config.max_wait_s),
            max_wait_s=config.max_wait_s,
            jitter_s=min(0.25, config.max_wait_s / 2),
            retry_after_cap_s=config.max_wait_s,
            before_attempt=self._count,
        )
        self.client = client or SmolLMClient(config.url, api_key=config.api_key)

    def _count(self, retry_state: tenacity.RetryCallState) -> None:
        self.attempts += 1

    def _retried(self, call: Callable[[], T]) -> T:
        for attempt in self.policy.retrying():
            with attempt:
                return call()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _tries(self) -> str:
        return f"{self.attempts} attempt{'s' if self.attempts != 1 else ''} in {self.budget.elapsed_s():.1f} s"

    def run(self) -> Result:
        result = Result(status=Status.OK, message="", url=self.config.url)
        try:
            self._check(result)
        except SmolLMClientError as exc:
            result.status, result.message = self._judge(exc, result)
        result.attempts = self.attempts
        result.elapsed_ms = round(self.budget.elapsed_s() * 1000, 1)
        return result

    def _check(self, result: Result) -> None:
        cfg = self.config

        def health() -> float:
            started = time.perf_counter()
            self.client.health(timeout=self.budget.timeout(cfg.connect_timeout_s, cfg.read_timeout_s), retry=NO_RETRY)
            return (time.perf_counter() - started) * 1000

        result.health_ms = round(self._retried(health), 1)
        result.state = "ok"
        result.model = self._model_name()
        name = f"model {result.model}" if result.model else "model"
        result.message = f"{name} ready ({result.health_ms:.0f} ms)"
        if not cfg.deep:
            return
        probe_ms, answer = self._retried(self._probe)
        result.probe_ms = round(probe_ms, 1)
        result.model = answer.model_info.get("model_name") or result.model
        queue_ms = float(answer.timings.get("queue_ms") or 0.0)
        tokens = answer.usage.completion_tokens
        summary = (
            f"model {result.model} ready ({result.health_ms:.0f} ms), deep probe answered "
            f"{tokens} token{'s' if tokens != 1 else ''} in {probe_ms:.0f} ms"
        )
        if probe_ms <= cfg.deadline_s * 1000:
            result.message = summary
        elif probe_ms - queue_ms <= cfg.deadline_s * 1000:
            # Slow only because it waited behind other requests: the model works, the host is busy.
            result.status = Status.WARNING
            result.message = f"{summary}, of which {queue_ms:.0f} ms in the queue (deadline {cfg.deadline_s:g} s)"
        else:
            result.status = Status.CRITICAL
            result.message = f"{summary}: slower than the {cfg.deadline_s:g} s deadline"

    def _probe(self) -> tuple[float, Completion]:
        cfg = self.config
        timeout = self.budget.timeout(cfg.connect_timeout_s, cfg.deadline_s)
        started = time.perf_counter()
        answer = self.client.chat(PROBE_MESSAGES, max_tokens=1, temperature=0, timeout=timeout, retry=NO_RETRY)
        return (time.perf_counter() - started) * 1000, answer

    def _model_name(self) -> str | None:
        """From /info, for the message only: it may need an API key this check was not given, so never fatal."""
        try:
            info = self.client.info(timeout=self.budget.timeout(self.config.connect_timeout_s, 2.0), retry=NO_RETRY)
        except SmolLMClientError as exc:
            log.info("no model name from /info: %s", exc)
            return None
        name = info.get("model_name")
        return name if isinstance(name, str) else None

    def _judge(self, exc: SmolLMClientError, result: Result) -> tuple[Status, str]:
        step = "deep probe" if result.state == "ok" else "health"
        tries = self._tries()
        if isinstance(exc, ServiceUnreachableError):
            return Status.CRITICAL, f"cannot connect to {self.config.url}: {_tail(exc)} ({tries})"
        if isinstance(exc, ResponseTimeoutError):
            # Connected but silent: a wedged event loop, or a decode loop that no longer advances.
            limit = self.config.deadline_s if step == "deep probe" else self.config.read_timeout_s
            return Status.CRITICAL, f"{step}: no answer within {limit:g} s ({tries})"
        if isinstance(exc, ServiceUnavailableError):
            result.state = exc.state or exc.error_type or result.state
            what = exc.state or exc.error_type or "unavailable"
            status = Status.WARNING if exc.retryable else Status.CRITICAL
            return status, f"{step}: model not serving ({what}): {_tail(exc)} ({tries})"
        if isinstance(exc, AuthenticationFailedError):
            return Status.UNKNOWN, f"{step}: the API key was refused ({exc.status_code}); pass --api-key"
        if isinstance(exc, ServerError):
            return Status.CRITICAL, f"{step} failed: {_tail(exc)}"
        if isinstance(exc, BadRequestError):
            return Status.UNKNOWN, f"{step}: unexpected answer: {_tail(exc)}"
        return Status.UNKNOWN, f"{step}: unexpected answer: {_tail(exc)}"


def _tail(exc: SmolLMClientError) -> str:
    """The error's message without the 'METHOD URL:' prefix the client puts first (the URL is said elsewhere)."""
    message = exc.message
    head, sep, rest = message.partition(": ")
    return rest if sep and head.split(" ", 1)[0] in {"GET", "POST"} else message


# --- the restart policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FailureRecord:
    consecutive_failures: int = 0
    last_restart_at: float | None = None


def next_record(
    record: FailureRecord, status: Status, *, now: float, restart_after: int, cooldown_s: float
) -> tuple[FailureRecord, bool]:
    """The record after a run with ``status``, and whether to restart now. Pure: the tests drive it directly.

    Only CRITICAL counts (WARNING is a model still loading, which a restart would only prolong), OK resets.
    A restart resets the count and starts the cool-down, during which no restart happens: never a restart loop.
    """
    if status is Status.OK:
        return dataclasses.replace(record, consecutive_failures=0), False
    if status is not Status.CRITICAL:
        return record, False
    failures = record.consecutive_failures + 1
    last = record.last_restart_at
    cooled = last is None or now - last >= cooldown_s
    if restart_after > 0 and failures >= restart_after and cooled:
        return FailureRecord(consecutive_failures=0, last_restart_at=now), True
    return FailureRecord(consecutive_failures=failures, last_restart_at=last), False


def load_record(path: Path) -> FailureRecord:
    try:
        data = json.loads(path.read_text())
        return FailureRecord(
            consecutive_failures=int(data.get("consecutive_failures", 0)),
            last_restart_at=None if data.get("last_restart_at") is None else float(data["last_restart_at"]),
        )
    except FileNotFoundError:
        return FailureRecord()
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return FailureRecord()


def save_record(path: Path, record: FailureRecord) -> None:
    # Write then rename: a run killed mid-write must not leave half a file for the next one.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record)) + "\n")
    tmp.replace(path)


def run_restart(command: str) -> str:
    argv = shlex.split(command)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("restart command %r failed: %s", command, exc)
        return f"restart command failed: {exc}"
    if done.returncode != 0:
        log.error("restart command %r exited %d: %s", command, done.returncode, done.stderr.strip())
        return f"restart command exited {done.returncode}"
    return "restart command succeeded"


def apply_restart_policy(result: Result, args: argparse.Namespace) -> None:
    path: Path = args.state_file
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Another run is updating the record right now; counting this run twice is worse than skipping it.
            log.warning("state file %s is locked by another run; not counting this one", path)
            return
        record = load_record(path)
        updated, restart = next_record(
            record,
            result.status,
            now=time.time(),  # wall clock: the cool-down must survive across runs (and reboots)
            restart_after=args.restart_after,
            cooldown_s=args.restart_cooldown,
        )
        if restart:
            log.warning(
                "restarting after %d consecutive failures: %s", record.consecutive_failures + 1, args.restart_command
            )
            outcome = run_restart(args.restart_command)
            result.message += (
                f"; {record.consecutive_failures + 1} consecutive failures, ran `{args.restart_command}`: {outcome}"
            )
        save_record(path, updated)
        result.extra.update(consecutive_failures=updated.consecutive_failures, restarted=restart)


# --- command line ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2, which would read as CRITICAL; a bad command line is UNKNOWN.
        self.print_usage(sys.stderr)
        print(f"UNKNOWN - bad arguments: {message}")
        sys.exit(Status.UNKNOWN)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="innova-smollm-healthcheck",
        description="Check that the innova-smollm model is loaded and answering. Prints one line, exits 0-3.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    env = os.environ
    parser.add_argument(
        "--url", default=env.get("SMOLLM_URL", DEFAULT_BASE_URL), help="service base URL (env SMOLLM_URL; %(default)s)"
    )
    parser.add_argument(
        "--api-key",
        default=env.get("SMOLLM_API_KEY"),
        help="bearer key for --deep when the service sets SMOLLM_API_KEYS (env SMOLLM_API_KEY); health needs none",
    )
    parser.add_argument("--deep", action="store_true", help="also generate one token and time it against --deadline")
    parser.add_argument(
        "--deadline", type=_positive, default=10.0, help="seconds the deep probe may take (%(default)s)"
    )
    parser.add_argument(
        "--max-time", type=_positive, default=30.0, help="bound on the whole run, retries included (%(default)s s)"
    )
    parser.add_argument("--connect-timeout", type=_positive, default=2.0, help="per attempt (%(default)s s)")
    parser.add_argument("--timeout", type=_positive, default=5.0, help="read timeout of /health (%(default)s s)")
    parser.add_argument(
        "--max-wait",
        type=_positive,
        default=5.0,
        help="longest pause between retries, caps Retry-After (%(default)s s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log retries (-v) and details (-vv)")
    policy = parser.add_argument_group("restart policy (off unless --restart-after is given)")
    policy.add_argument("--state-file", type=Path, help="where consecutive failures and the last restart are kept")
    policy.add_argument(
        "--restart-after", type=int, default=0, metavar="N", help="restart after N consecutive CRITICAL runs"
    )
    policy.add_argument("--restart-command", default=DEFAULT_RESTART_COMMAND, help="what a restart runs: %(default)s")
    policy.add_argument(
        "--restart-cooldown", type=_positive, default=900.0, help="no restart within this many seconds of the last one"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.deep and args.deadline > args.max_time:
        parser.error("--deadline must not exceed --max-time")
    if args.restart_after < 0:
        parser.error("--restart-after must be 0 (off) or more")
    if args.restart_after and args.state_file is None:
        parser.error("--restart-after needs --state-file to count failures across runs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    levels = {0: logging.ERROR, 1: logging.INFO}
    logging.basicConfig(level=levels.get(args.verbose, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    config = CheckConfig(
        url=args.url.rstrip("/"),
        api_key=args.api_key or None,
        deep=args.deep,
        deadline_s=args.deadline,
        max_time_s=args.max_time,
        connect_timeout_s=args.connect_timeout,
        read_timeout_s=args.timeout,
        max_wait_s=args.max_wait,
    )
    try:
        checker = Checker(config)
        with checker.client:
            result = checker.run()
        if args.state_file is not None:
            apply_restart_policy(result, args)
    except Exception as exc:  # a bug here must still answer in the plugin format, not with a traceback and exit 1
        log.exception("health check failed unexpectedly")
        result = Result(status=Status.UNKNOWN, message=f"internal error: {exc!r}", url=config.url)
    print(result.as_json() if args.json else result.line(), flush=True)
    return int(result.status)


if __name__ == "__main__":
    sys.exit(main())
