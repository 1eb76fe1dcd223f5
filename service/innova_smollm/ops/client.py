"""A small blocking client for the innova-smollm HTTP API, for the KORYXA backend and the ops tools.

It needs only ``requests`` and ``tenacity`` (no litestar, no llama_cpp), so it installs with the bare package.

Every call has a ``(connect, read)`` timeout. One retry policy (:class:`RetryPolicy`) decides what is retried:
connection failures (the service is restarting or not yet bound) and 503 answers (loading, queue full), waiting
for the server's ``Retry-After`` when it sends one. A read timeout is never retried: the server may still be
generating, and a second request would only queue behind the first. A stream is retried only until its response
headers arrive; once text has started to flow, a failure is reported, never replayed.

Example::

    with SmolLMClient("http://127.0.0.1:8000") as client:
        answer = client.chat([{"role": "user", "content": "Bonjour"}], max_tokens=64)
        print(answer.text, answer.usage.total_tokens)

        with client.stream("Raconte une histoire courte.") as chunks:
            for chunk in chunks:
                print(chunk, end="", flush=True)
        print(chunks.result.finish_reason)

Tools (answered by the OpenAI-compatible route, ``/v1/chat/completions``, which is where the service takes them)::

        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {...}}}
        history = [{"role": "user", "content": "Weather in Paris?"}]
        answer = client.chat(history, tools=[weather], tool_choice="required")
        (call,) = answer.tool_calls  # call.name, call.arguments (a dict), call.id
        history += [answer.assistant_message(), {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
        print(client.chat(history, tools=[weather]).text)
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import requests
import tenacity
import urllib3

from innova_smollm import __version__

log = logging.getLogger(__name__)

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8000"
API: Final = "/innova/api/smollm"
CHATLAYA_MESSAGE: Final = "/innova/api/chatlaya/message"

#: (connect, read). Connecting to a local service takes milliseconds; a long answer on a CPU can take minutes.
DEFAULT_TIMEOUT: Final = (3.05, 300.0)

Timeout = tuple[float, float]
#: One user message, or ``{"role", "content"}`` messages (with ``tool_calls`` / ``tool_call_id`` in a tool loop).
Messages = str | Sequence[Mapping[str, Any]]
OPENAI_CHAT: Final = "/v1/chat/completions"

#: 503 states that no amount of waiting fixes: an operator has to act, so retrying only delays the bad news.
PERMANENT_STATES: Final = frozenset({"error", "disabled"})


# --- errors ----------------------------------------------------------------------------------------------------


class SmolLMClientError(Exception):
    """Base of every error this client raises."""

    def __init__(self, message: str, *, status_code: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type


class ServiceUnreachableError(SmolLMClientError):
    """No connection could be made (refused, reset, DNS, or the connect timeout ran out)."""


class ResponseTimeoutError(SmolLMClientError):
    """Connected, but no answer within the read timeout. Not retried: the server may still be working on it."""


class ServiceUnavailableError(SmolLMClientError):
    """HTTP 503: the model is loading, stopping, busy (queue full), broken or disabled.

    ``state`` is the service state when the server names one (``loading``, ``error``, ...), ``retry_after`` the
    server's ``Retry-After`` in seconds, when sent.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        state: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message, status_code=503, error_type=error_type)
        self.retry_after = retry_after
        self.state = state

    @property
    def retryable(self) -> bool:
        return self.state not in PERMANENT_STATES


class BadRequestError(SmolLMClientError):
    """A 4xx other than 401/403: the request itself is wrong. ``field`` names the culprit when the server knows it."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_type: str | None = None,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, error_type=error_type)
        self.field = field
        self.details = dict(details or {})


class AuthenticationFailedError(SmolLMClientError):
    """401/403: the API key is missing or wrong (the service has SMOLLM_API_KEYS set)."""


class ServerError(SmolLMClientError):
    """A 5xx other than 503: the server failed on this request."""


class UnexpectedResponseError(SmolLMClientError):
    """The answer is not what this API sends (not JSON, a missing field): a proxy in the way, or a wrong URL."""


class StreamError(SmolLMClientError):
    """A stream failed after it started: an ``error`` event, a broken connection, or no ``done`` event."""


# --- results ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """A tool call the model made. Run the tool with ``arguments``, then send its result back as a message
    ``{"role": "tool", "tool_call_id": id, "content": ...}`` after :meth:`Completion.assistant_message`."""

    id: str
    name: str
    #: The arguments, parsed: with ``tool_choice`` ``required`` or a named tool they follow its ``parameters``.
    arguments: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A finished answer: the text of /chat (``response``) or /generate (``text``), or of a whole stream.

    An answer with ``tools`` comes from ``/v1/chat/completions``: ``finish_reason`` is ``tool_calls`` when it is a
    call (``text`` is then empty), ``model_info`` holds ``model_name`` only, and there are no ``timings``.
    """

    text: str
    finish_reason: str
    usage: Usage
    #: model_name, device, parameters, provider, quantization, n_ctx, fallback_reason
    model_info: dict[str, Any]
    #: queue_ms, first_token_ms, total_ms, tokens_per_second
    timings: dict[str, Any]
    #: With ``response_format``: the answer parsed (JSON, or an instance of the pydantic model given), when it
    #: finished with ``stop``; None otherwise (an answer cut by max_tokens is unfinished JSON).
    parsed: Any = None
    #: With ``tools``: the calls the answer makes (one at most: the service makes one call per answer).
    tool_calls: tuple[ToolCall, ...] = ()

    def assistant_message(self) -> dict[str, Any]:
        """This answer as the assistant turn to append to the history, tool calls included (OpenAI's shape)."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.text if self.text or not self.tool_calls else None,
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
                }
                for call in self.tool_calls
            ]
        return message


@dataclass(frozen=True, kw_only=True)
class Health:
    status: str
    elapsed_ms: float


# --- the retry policy ------------------------------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    """Connection failures and transient 503s; never a read timeout, never anything after a stream started."""
    if isinstance(exc, ServiceUnavailableError):
        return exc.retryable
    return isinstance(exc, ServiceUnreachableError)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When and how long to retry. One object, shared by every call of a client.

    ``max_attempts`` and ``max_total_s`` both bound it: it stops at whichever comes first, and never sleeps past
    ``max_total_s``. A 503's ``Retry-After`` is honoured up to ``retry_after_cap_s``; without one, the wait grows
    exponentially from ``initial_wait_s`` to ``max_wait_s`` with up to ``jitter_s`` of random jitter, so that
    clients that failed together do not come back together.
    """

    max_attempts: int = 4
    max_total_s: float = 30.0
    initial_wait_s: float = 0.5
    max_wait_s: float = 8.0
    jitter_s: float = 0.5
    retry_after_cap_s: float = 10.0
    #: Called before every attempt (tenacity's ``before``): a place to count attempts or to trace them.
    before_attempt: Callable[[tenacity.RetryCallState], None] | None = field(default=None, compare=False)

    def wait_s(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, ServiceUnavailableError) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_after_cap_s)
        backoff = self.initial_wait_s * 2.0 ** (retry_state.attempt_number - 1)
        return min(backoff + random.uniform(0, self.jitter_s), self.max_wait_s)

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_retryable),
            wait=self.wait_s,
            stop=tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_before_delay(self.max_total_s),
            before=self.before_attempt or tenacity.before_nothing,
            before_sleep=_log_retry,
            reraise=True,
        )


def _log_retry(retry_state: tenacity.RetryCallState) -> None:
    # tenacity's before_sleep_log names the retried function, which is "<unknown>" for a Retrying loop.
    outcome = retry_state.outcome
    sleep = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
    log.warning(
        "attempt %d failed (%s); retrying in %.2f s",
        retry_state.attempt_number,
        outcome.exception() if outcome is not None else "?",
        sleep,
    )


#: One attempt, no retry: for callers that run their own loop (the health check) or must not wait.
NO_RETRY: Final = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delay-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --- the client ------------------------------------------------------------------------------------------------


class SmolLMClient:
    """Blocking client of one innova-smollm service.

    It keeps one ``requests.Session`` (connection reuse); share a client between threads only if you share the
    session that way elsewhere, else give each thread its own. ``timeout`` and ``retry`` can be overridden per call.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        *,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = _check_timeout(timeout)
        self.retry = retry or RetryPolicy()
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._headers = {"User-Agent": f"innova-smollm-client/{__version__}", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never show the key
        return f"SmolLMClient({self.base_url!r}, timeout={self.timeout})"

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- API -----------------------------------------------------------------------------------------------------

    def health(self, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None) -> Health:
        """Readiness. Returns on 200; raises :class:`ServiceUnavailableError` (with ``state``) on 503."""
        started = time.perf_counter()
        body = self._json("GET", f"{API}/health", timeout=timeout, retry=retry)
        status = body.get("status")
        if status != "ok":
            raise UnexpectedResponseError(f"/health answered 200 with status {status!r}", status_code=200)
        return Health(status=status, elapsed_ms=(time.perf_counter() - started) * 1000)

    def info(self, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None) -> dict[str, Any]:
        """Model and service metadata: state, model_name, parameters, quantization, n_ctx, in_flight, ..."""
        return self._json("GET", f"{API}/info", timeout=timeout, retry=retry)

    def chat(
        self, messages: Messages, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None, **options: Any
    ) -> Completion:
        """Answer a conversation. ``messages`` is a list of ``{"role", "content"}`` or one user message as a string.

        ``options``: max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, frequency_penalty,
        presence_penalty, logit_bias, stop, seed, grammar (as the API names them), and ``response_format``: the
        API's own dict, a JSON schema (a dict), or a pydantic model class; with a schema or a model the answer is
        constrained to it and comes back parsed in ``Completion.parsed`` (validated by the model's class).

        ``tools`` (OpenAI's ``{"type": "function", "function": {"name", "description", "parameters"}}``) and
        ``tool_choice`` (``auto``, ``none``, ``required``, a tool's name, or OpenAI's dict) send the request to
        ``/v1/chat/completions`` (``grammar`` is not taken there); the calls come back parsed in
        ``Completion.tool_calls``. Messages may then carry ``tool_calls`` and ``tool_call_id`` (a tool loop).
        """
        options, parse = _response_format(options)
        if "tools" in options or "tool_choice" in options:
            payload = _tools_payload(messages, options)
            body = self._json("POST", OPENAI_CHAT, payload=payload, timeout=timeout, retry=retry)
            return parse(_openai_completion(body))
        body = self._json("POST", f"{API}/chat", payload=_chat_payload(messages, options), timeout=timeout, retry=retry)
        return parse(_completion(body, text_key="response"))

    def generate(
        self, prompt: str, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None, **options: Any
    ) -> Completion:
        """Continue raw text (no chat template); ``options`` as for :meth:`chat`."""
        options, parse = _response_format(options)
        payload = {**_options(options), "prompt": prompt}
        body = self._json("POST", f"{API}/generate", payload=payload, timeout=timeout, retry=retry)
        return parse(_completion(body, text_key="text"))

    def stream(
        self, messages: Messages, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None, **options: Any
    ) -> TextStream:
        """Answer a conversation as it is generated: iterate the result for text chunks.

        The request is sent (and retried) before this returns, so a 4xx or an exhausted 503 raises here. Read
        ``.result`` after the loop for finish_reason, usage and timings. The read timeout applies between chunks.
        """
        payload = {**_chat_payload(messages, options), "stream": True}
        return self._open_stream(f"{API}/chat", payload, timeout=timeout, retry=retry)

    def stream_generate(
        self, prompt: str, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None, **options: Any
    ) -> TextStream:
        """Like :meth:`stream`, continuing raw text."""
        payload = {**_options(options), "prompt": prompt, "stream": True}
        return self._open_stream(f"{API}/generate", payload, timeout=timeout, retry=retry)

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        payload: Mapping[str, Any] | None = None,
        timeout: Timeout | None,
        retry: RetryPolicy | None,
    ) -> dict[str, Any]:
        response = self._send(method, path, payload=payload, timeout=timeout, retry=retry, stream=False)
        return _json_object(response)

    def _open_stream(
        self, path: str, payload: Mapping[str, Any], *, timeout: Timeout | None, retry: RetryPolicy | None
    ) -> TextStream:
        response = self._send("POST", path, payload=payload, timeout=timeout, retry=retry, stream=True)
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            response.close()
            raise UnexpectedResponseError(
                f"{path} answered {response.headers.get('Content-Type')!r}, not an event stream", status_code=200
            )
        return TextStream(response)

    def _send(
        self,
        method: str,
        path: str,
        *,
        payload: Mapping[str, Any] | None,
        timeout: Timeout | None,
        retry: RetryPolicy | None,
        stream: bool,
    ) -> requests.Response:
        """One request under the retry policy; returns only a 2xx response (for a stream: with the body unread)."""
        policy = retry or self.retry
        for attempt in policy.retrying():
            with attempt:
                return self._attempt(method, path, payload=payload, timeout=timeout or self.timeout, stream=stream)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _attempt(
        self, method: str, path: str, *, payload: Mapping[str, Any] | None, timeout: Timeout, stream: bool
    ) -> requests.Response:
        url = self.base_url + path
        try:
            response = self._session.request(
                method, url, json=payload, headers=self._headers, timeout=timeout, stream=stream
            )
        # ConnectTimeout is both a ConnectionError and a Timeout: it must be caught before ReadTimeout's base.
        except requests.exceptions.ConnectTimeout as exc:
            raise ServiceUnreachableError(f"{method} {url}: no connection within {timeout[0]:g} s") from exc
        except requests.exceptions.ReadTimeout as exc:
            raise ResponseTimeoutError(f"{method} {url}: no answer within {timeout[1]:g} s") from exc
        except requests.exceptions.ConnectionError as exc:
            raise ServiceUnreachableError(f"{method} {url}: {_reason(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise SmolLMClientError(f"{method} {url}: {exc}") from exc
        if response.status_code < 300:
            return response
        try:
            raise _error_from(response)
        finally:
            response.close()


class TextStream(Iterator[str]):
    """Text chunks of a streamed answer, then :attr:`result`. Use it in a ``with`` block, or exhaust it.

    Closing it early (``break``, ``close()``) drops the connection, and the server stops generating.
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._parts: list[str] = []
        self._result: Completion | None = None
        self._chunks = self._read()

    @property
    def result(self) -> Completion:
        """The whole answer with finish_reason, usage and timings, once the stream has ended."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _read(self) -> Generator[str, None, None]:
        try:
            for event, data in _sse_events(self._response):
                if event == "token":
                    chunk = data.get("text")
                    if not isinstance(chunk, str):
                        raise StreamError(f"a token event without text: {data!r}", status_code=200)
                    self._parts.append(chunk)
                    yield chunk
                elif event == "done":
                    self._result = _completion({**data, "text": self.text}, text_key="text")
                    return
                elif event == "error":
                    error: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else {}
                    raise StreamError(
                        f"the stream failed: {error.get('message', data)}",
                        status_code=200,
                        error_type=error.get("type"),
                    )
                # Other events (a future "ping") are not ours to interpret.
            raise StreamError("the stream ended without a done event", status_code=200)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # A broken connection, a truncated body, or the read timeout between two chunks: the answer is lost.
            raise StreamError(f"the stream broke after {len(self._parts)} chunks: {_reason(exc)}") from exc
        finally:
            self._response.close()


# --- helpers ---------------------------------------------------------------------------------------------------


def _check_timeout(timeout: Timeout) -> Timeout:
    connect, read = timeout
    if not (connect > 0 and read > 0):
        raise ValueError(f"timeout must be a (connect, read) pair of positive seconds, not {timeout!r}")
    return (float(connect), float(read))


#: ``response_format`` types of the API; any other dict given as ``response_format`` is a JSON schema.
_FORMAT_TYPES: Final = frozenset({"text", "json_object", "json_schema"})


def _response_format(options: Mapping[str, Any]) -> tuple[dict[str, Any], Callable[[Completion], Completion]]:
    """The options with ``response_format`` in the API's shape, and how to parse the answer it asks for."""
    wanted = options.get("response_format")
    if wanted is None:
        return dict(options), _unparsed
    # Any pydantic v2 model class; duck-typed so that the client never imports pydantic.
    model: Any = wanted if isinstance(wanted, type) and hasattr(wanted, "model_json_schema") else None
    if model is not None:
        schema = model.model_json_schema()
        response_format = {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema}}
    elif isinstance(wanted, Mapping) and wanted.get("type") in _FORMAT_TYPES:
        response_format = dict(wanted)
    elif isinstance(wanted, Mapping):
        response_format = {"type": "json_schema", "json_schema": {"name": "schema", "schema": dict(wanted)}}
    else:
        raise TypeError("response_format is a dict (the API's, or a JSON schema) or a pydantic model class")

    def parse(completion: Completion) -> Completion:
        if response_format["type"] == "text" or completion.finish_reason != "stop":
            return completion
        try:
            parsed = model.model_validate_json(completion.text) if model is not None else json.loads(completion.text)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise UnexpectedResponseError(f"a constrained answer that does not parse: {exc}") from None
        return dataclasses.replace(completion, parsed=parsed)

    return {**options, "response_format": response_format}, parse


def _unparsed(completion: Completion) -> Completion:
    return completion


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


def _chat_payload(messages: Messages, options: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(messages, str):
        listed = [{"role": "user", "content": messages}]
    else:
        listed = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {**_options(options), "messages": listed}


def _tools_payload(messages: Messages, options: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request: the messages as given (tool calls and results included), the tool choice by name."""
    if isinstance(messages, str):
        listed: list[dict[str, Any]] = [{"role": "user", "content": messages}]
    else:
        listed = [dict(m) for m in messages]
    payload = _options(options)
    tools = payload.get("tools")
    if tools is not None:
        payload["tools"] = list(tools)
    choice = payload.get("tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        payload["tool_choice"] = {"type": "function", "function": {"name": choice}}
    return {**payload, "messages": listed}


def _openai_completion(body: Mapping[str, Any]) -> Completion:
    try:
        (choice,) = body["choices"]
        message = choice["message"]
        usage = body["usage"]
        calls = tuple(
            ToolCall(id=str(call["id"]), name=str(call["function"]["name"]), arguments=_arguments(call))
            for call in message.get("tool_calls") or ()
        )
        return Completion(
            text=str(message.get("content") or ""),
            finish_reason=str(choice["finish_reason"]),
            usage=Usage(
                prompt_tokens=int(usage["prompt_tokens"]),
                completion_tokens=int(usage["completion_tokens"]),
                total_tokens=int(usage["total_tokens"]),
            ),
            model_info={"model_name": body.get("model")},
            timings={},
            tool_calls=calls,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UnexpectedResponseError(f"an answer without the expected fields ({exc!r}): {dict(body)!r:.300}") from None


def _arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    arguments = json.loads(call["function"]["arguments"])
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of a call to {call['function']['name']!r} are not a JSON object")
    return arguments


def _reason(exc: BaseException) -> str:
    """'connection refused' rather than urllib3's pool and adapter reprs, when the cause is a common one."""
    text = str(exc)
    for marker in ("Connection refused", "Connection reset", "Name or service not known", "Read timed out"):
        if marker in text:
            return marker.lower()
    return text


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise UnexpectedResponseError(
            f"{response.request.method} {response.url} answered {response.status_code} "
            f"with a body that is not JSON: {response.text[:200]!r}",
            status_code=response.status_code,
        ) from None
    if not isinstance(body, dict):
        raise UnexpectedResponseError(f"{response.url} answered a JSON {type(body).__name__}, not an object")
    return body


def _error_from(response: requests.Response) -> SmolLMClientError:
    status = response.status_code
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    error_type = error.get("type")
    details: dict[str, Any] = error["details"] if isinstance(error.get("details"), dict) else {}
    message = str(error.get("message") or body.get("detail") or response.reason or f"HTTP {status}")
    where = f"{response.request.method} {response.url}"
    if status == 503:
        # /health says {"status", "detail"}; the other routes say {"error": {"type": "not_ready", "details"}}.
        state = body.get("status", details.get("status"))
        return ServiceUnavailableError(
            f"{where}: 503 {message}",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            state=state if isinstance(state, str) else None,
            error_type=error_type,
        )
    if status in (401, 403):
        return AuthenticationFailedError(f"{where}: {status} {message}", status_code=status, error_type=error_type)
    if 400 <= status < 500:
        return BadRequestError(
            f"{where}: {status} {message}",
            status_code=status,
            error_type=error_type,
            field=error.get("field", error.get("param")),  # /v1 routes name it as OpenAI does
            details=details,
        )
    if parsed is None:
        return UnexpectedResponseError(f"{where}: {status} with a body that is not JSON", status_code=status)
    return ServerError(f"{where}: {status} {message}", status_code=status, error_type=error_type)


def _completion(body: Mapping[str, Any], *, text_key: str) -> Completion:
    try:
        usage = body["usage"]
        return Completion(
            text=str(body[text_key]),
            finish_reason=str(body["finish_reason"]),
            usage=Usage(
                prompt_tokens=int(usage["prompt_tokens"]),
                completion_tokens=int(usage["completion_tokens"]),
                total_tokens=int(usage["total_tokens"]),
            ),
            model_info=dict(body.get("model_info") or {}),
            timings=dict(body.get("timings") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UnexpectedResponseError(f"an answer without the expected fields ({exc!r}): {dict(body)!r:.300}") from None


def _arrivals(response: requests.Response) -> Iterator[bytes]:
    """Body bytes as they arrive.

    ``iter_content(n)`` waits for n bytes when the body is not chunked (a proxy may de-chunk it), and
    ``iter_content(None)`` then waits for the end; ``read1`` returns whatever one read of the socket brings.
    """
    while data := response.raw.read1(65536):
        yield data


def _sse_events(response: requests.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of an SSE body, as each event completes. Bytes are decoded as UTF-8 whatever the headers say."""
    event, data_lines = "message", list[str]()
    pending = b""
    for data in _arrivals(response):
        *lines, pending = (pending + data).split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8")
            if not line:
                if data_lines:
                    yield event, _event_data("\n".join(data_lines))
                event, data_lines = "message", []
            elif line.startswith(":"):
                continue
            elif line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data_lines.append(line[len("data:") :].removeprefix(" "))
    if data_lines:
        yield event, _event_data("\n".join(data_lines))


def _event_data(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        raise StreamError(f"an event whose data is not JSON: {text[:200]!r}", status_code=200) from None
    if not isinstance(data, dict):
        raise StreamError(f"an event whose data is not a JSON object: {text[:200]!r}", status_code=200)
    return data
