"""The model service: state, request preparation and the two ways to run a request.

Both the HTTP routes and the in-process API (:func:`innova_smollm.get_smollm_model`) go through one
:class:`ModelService`, so the limits, the context check, the echo provider and the fallback behave the same
everywhere. It knows nothing of HTTP and nothing of llama.cpp: it talks to an :class:`~innova_smollm.core.types.Engine`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from innova_smollm.core.admission import Admission, Ticket
from innova_smollm.core.schema import ConstraintKind, OutputConstraint
from innova_smollm.core.sinks import AsyncSink, BlockingSink, Event, Failed, Finished, Started, Text
from innova_smollm.core.types import (
    ChatMessage,
    Engine,
    FinishReason,
    GenerationJob,
    ModelMetadata,
    SamplingParams,
    TokenLogprob,
)
from innova_smollm.errors import (
    ContextLengthExceededError,
    GenerationError,
    InvalidRequestError,
    NotReadyError,
    RequestTimeoutError,
    ServiceError,
)
from innova_smollm.settings import Fallback, KVLayout, Provider, Settings

log = logging.getLogger(__name__)

EngineLoader = Callable[[Settings], Engine]


class State(StrEnum):
    LOADING = "loading"
    OK = "ok"
    ERROR = "error"
    DISABLED = "disabled"
    STOPPING = "stopping"


class Source(StrEnum):
    LOCAL = "local"
    ECHO = "echo"
    ECHO_FALLBACK = "echo-fallback"


@dataclass(frozen=True, kw_only=True)
class RequestOptions:
    """What a caller may tune, already type-checked by the wire schema."""

    max_tokens: int | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: (token id, bias); ids are checked against the vocabulary when the request is prepared.
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: What the answer must be (JSON, JSON valid against a schema, a GBNF grammar); None: free text.
    constraint: OutputConstraint | None = None
    #: None: no log probabilities; k: each answer token's with the k most likely alternatives.
    logprobs: int | None = None
    #: How many answers (choices) to generate for the prompt, at most SMOLLM_PARALLEL.
    n: int = 1
    #: The request field that holds ``logit_bias``, for error messages.
    logit_bias_field: str = "logit_bias"


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A request that passed every check and is ready to run."""

    source: Source
    prompt_tokens: int
    job: GenerationJob | None = None
    echo_text: str = ""
    fallback_reason: str | None = None
    arrived_at: float = field(default_factory=time.monotonic)
    #: How many choices the answer has (the job's ``n``; the echo repeats its text in each).
    n: int = 1


@dataclass(frozen=True)
class Chunk:
    """Text of one choice of a streamed answer, with the log probabilities of exactly the tokens it carries (when
    asked for; a token whose text never came, as one a stop string cut away, comes in the choice's
    :attr:`Choice.logprobs` only)."""

    text: str
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One answer of a request (a request with ``n`` choices has n of them)."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    #: One per answer token when the request asked for log probabilities.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How a request ended, for the final answer or the final stream event.

    ``text``, ``finish_reason`` and ``logprobs`` are the first choice's, ``completion_tokens`` the sum over the
    choices (the prompt was decoded once); ``choices`` holds every choice, in order of index.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    source: Source
    fallback_reason: str | None
    queue_s: float
    first_token_s: float | None
    total_s: float
    #: One per answer token when the request asked for log probabilities.
    logprobs: tuple[TokenLogprob, ...] | None = None
    choices: tuple[Choice, ...] = ()

    @property
    def decoded_tokens(self) -> int:
        """Answer tokens one sequence decoded: the longest choice's (the choices decode side by side)."""
        return max((choice.completion_tokens for choice in self.choices), default=self.completion_tokens)

    @property
    def tokens_per_second(self) -> float | None:
        """One sequence's decode speed after the first token (with ``n`` choices, each choice's)."""
        if self.first_token_s is None or self.decoded_tokens < 2:
            return None
        decode_s = self.total_s - self.first_token_s
        return (self.decoded_tokens - 1) / decode_s if decode_s > 0 else None


class Observer(Protocol):
    """Hears how requests end, e.g. to export metrics. Called on the event loop or a worker thread: return quickly."""

    def on_outcome(self, outcome: Outcome) -> None:
        """A request produced its answer (model, echo or fallback)."""
        ...

    def on_cancelled(self) -> None:
        """A running request's caller went away before its answer was complete."""
        ...


class _NoObserver:
    def on_outcome(self, outcome: Outcome) -> None:
        pass

    def on_cancelled(self) -> None:
        pass


class _Collector:
    """Folds engine events into an :class:`Outcome`; shared by the async and the blocking paths."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.parts: dict[int, list[str]] = {}
        self.choices: dict[int, Choice] = {}
        self.queue_s = 0.0
        self.first_token_at: float | None = None
        self.started = False

    def on_text(self, chunk: str, produced_at: float, choice: int = 0) -> None:
        if self.first_token_at is None:
            self.first_token_at = produced_at
        self.parts.setdefault(choice, []).append(chunk)

    def finished(
        self,
        reason: FinishReason,
        completion_tokens: int,
        logprobs: tuple[TokenLogprob, ...] | None = None,
        choice: int = 0,
    ) -> Outcome | None:
        """One choice ended: the outcome once they all have, else None."""
        text = "".join(self.parts.get(choice, ()))
        self.choices[choice] = Choice(
            index=choice, text=text, finish_reason=reason, completion_tokens=completion_tokens, logprobs=logprobs
        )
        if len(self.choices) < self.prepared.n:
            return None
        return self.outcome()

    def outcome(self) -> Outcome:
        now = time.monotonic()
        arrived = self.prepared.arrived_at
        choices = tuple(self.choices[index] for index in sorted(self.choices))
        first = choices[0]
        return Outcome(
            text=first.text,
            finish_reason=first.finish_reason,
            prompt_tokens=self.prepared.prompt_tokens,
            completion_tokens=sum(choice.completion_tokens for choice in choices),
            source=self.prepared.source,
            fallback_reason=self.prepared.fallback_reason,
            queue_s=self.queue_s,
            first_token_s=None if self.first_token_at is None else self.first_token_at - arrived,
            total_s=now - arrived,
            logprobs=first.logprobs,
            choices=choices,
        )


class ModelService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        loader: EngineLoader | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self._observer: Observer = observer or _NoObserver()
        self._engine = engine
        # An engine handed in belongs to the caller, who may share it; one we load is ours to close.
        self._owns_engine = engine is None
        self._loader = loader
        self._state = State.OK if engine is not None else State.LOADING
        self._detail: str | None = None
        self._admission = Admission(parallel=settings.parallel, max_queue=settings.max_queue)
        if not settings.enabled:
            self._state, self._detail = State.DISABLED, "ENABLE_SMOLLM is false"
        elif settings.provider is Provider.ECHO:
            self._state = State.OK

    # --- lifecycle -------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def detail(self) -> str | None:
        return self._detail

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def load(self) -> None:
        """Load the model (blocking). Failures are kept as state, never raised: the process stays up to say why."""
        if self._state is not State.LOADING:
            return
        if self._loader is None:
            self._fail_load("no model loader was configured")
            return
        started = time.perf_counter()
        try:
            engine = self._loader(self.settings)
        except ServiceError as exc:
            self._fail_load(exc.message)
            return
        except Exception as exc:  # a loader bug must not kill the process: report it on health instead
            log.exception("unexpected error while loading %s", self.settings.model_path)
            self._fail_load(f"unexpected error while loading {self.settings.model_path}: {exc}")
            return
        if self.state is State.STOPPING:  # shutdown began while the model was loading
            engine.close()
            return
        self._engine = engine
        self._state = State.OK
        meta = engine.metadata
        log.info(
            "model loaded",
            extra={
                "event": "model_loaded",
                "model": meta.name,
                "parameters": meta.parameters,
                "quantization": meta.quantization,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    def _fail_load(self, message: str) -> None:
        self._state, self._detail = State.ERROR, message
        log.error("model not loaded: %s", message, extra={"event": "model_load_failed"})

    def begin_shutdown(self) -> None:
        """Readiness turns 503 at once; requests already admitted carry on."""
        if self._state is not State.DISABLED:
            self._state, self._detail = State.STOPPING, "the service is shutting down"

    def close(self) -> None:
        self.begin_shutdown()
        engine, self._engine = self._engine, None
        if engine is not None and self._owns_engine:
            engine.close()

    @property
    def in_flight(self) -> int:
        return self._admission.in_flight

    # --- describing the model ---------------------------------------------------------------------------------

    def metadata(self) -> ModelMetadata | None:
        return self._engine.metadata if self._engine is not None else None

    def model_info(self, source: Source, fallback_reason: str | None = None) -> dict[str, object]:
        meta = self.metadata()
        if source is Source.ECHO or meta is None:
            return {
                "model_name": "echo" if source is Source.ECHO else self.settings.model_name,
                "device": "none",
                "parameters": 0,
                "provider": source.value,
                "quantization": "none",
                "n_ctx": self.settings.n_ctx,
                "fallback_reason": fallback_reason,
            }
        return {
            "model_name": meta.name,
            "device": meta.device,
            "parameters": meta.parameters,
            "provider": source.value,
            "quantization": meta.quantization,
            "n_ctx": meta.n_ctx,
            "fallback_reason": fallback_reason,
        }

    # --- preparing requests -----------------------------------------------------------------------------------

    def chat_template(self) -> str | None:
        """The chat template the model renders conversations with; None while no model serves (the echo answers)."""
        if self._unavailable() is not None or self._engine is None:
            return None
        return self._engine.chat_template

    def prepare_chat(
        self,
        messages: Sequence[ChatMessage],
        options: RequestOptions,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prepared:
        """``tools`` go to the chat template (one that knows tools); a generic tools prompt is in ``messages``."""
        self._check_common(options)
        if not messages:
            raise InvalidRequestError("messages must hold at least one message", field="messages")
        if len(messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"{len(messages)} messages exceed the limit of {self.settings.max_messages} (SMOLLM_MAX_MESSAGES)",
                field="messages",
            )
        unavailable = self._unavailable()
        if unavailable is not None:
            self._check_echo_can_answer(options)
            return self._echo(_last_user_text(messages), unavailable, options.n)
        assert self._engine is not None
        try:
            tokens = self._engine.tokenize_chat(messages, tools)
        except ServiceError:
            raise
        except Exception as exc:
            raise InvalidRequestError(
                f"the chat template could not render these messages: {exc}", field="messages"
            ) from None
        return self._local(tokens, options, _last_user_text(messages))

    def prepare_generate(self, prompt: str, options: RequestOptions) -> Prepared:
        self._check_common(options)
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        unavailable = self._unavailable()
        if unavailable is not None:
            self._check_echo_can_answer(options)
            return self._echo(prompt, unavailable, options.n)
        assert self._engine is not None
        return self._local(self._engine.tokenize(prompt), options, prompt)

    def _check_common(self, options: RequestOptions) -> None:
        if options.max_tokens is not None and options.max_tokens > self.settings.max_tokens:
            raise InvalidRequestError(
                f"max_tokens={options.max_tokens} exceeds the server cap of {self.settings.max_tokens} "
                "(SMOLLM_MAX_TOKENS)",
                field="max_tokens",
            )
        if options.constraint is not None and options.stop:
            # A stop string could cut the constrained text anywhere and still say `stop`: refused, not ignored.
            raise InvalidRequestError(
                f"stop cannot be combined with {options.constraint.field}: a stop string could end the answer "
                "before the constrained text is complete",
                field="stop",
            )
        if options.n > self.settings.parallel:
            raise InvalidRequestError(
                f"n={options.n} exceeds SMOLLM_PARALLEL={self.settings.parallel}: the choices of one request decode "
                "side by side, one sequence each",
                field="n",
            )
        if len(options.stop) > self.settings.max_stop_sequences:
            raise InvalidRequestError(
                f"{len(options.stop)} stop strings exceed the limit of {self.settings.max_stop_sequences}",
                field="stop",
            )

    def _check_echo_can_answer(self, options: RequestOptions) -> None:
        """The echo provider repeats text: it cannot honour an output constraint, so such a request is refused."""
        if options.logprobs is not None:
            raise InvalidRequestError(
                "logprobs need the local model, and the echo provider is answering", field="logprobs"
            )
        if options.constraint is not None:
            raise InvalidRequestError(
                f"{options.constraint.field} needs the local model, and the echo provider is answering "
                f"({'PROVIDER=echo' if self.settings.provider is Provider.ECHO else 'the model is not loaded'})",
                field=options.constraint.field,
            )

    # --- tokens ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self._serving_engine().tokenize_text(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, tokens: Sequence[int], *, field: str = "tokens") -> list[bytes]:
        engine = self._serving_engine()
        pieces = []
        for index, token in enumerate(tokens):
            try:
                pieces.append(engine.token_bytes(token))
            except ValueError as exc:
                raise InvalidRequestError(str(exc), field=f"{field}[{index}]") from None
        return pieces

    def _serving_engine(self) -> Engine:
        if self._unavailable() is not None or self._engine is None:
            raise NotReadyError(self._state.value, "the tokenizer needs the local model, which is not serving")
        return self._engine

    def _grammar(self, constraint: OutputConstraint | None) -> str | None:
        """The engine's checked grammar for an output constraint (400 naming the field when it cannot be used)."""
        if constraint is None:
            return None
        assert self._engine is not None
        try:
            if constraint.kind is ConstraintKind.GRAMMAR:
                gbnf = constraint.grammar or ""
                error = self._engine.grammar_error(gbnf)
                if error is not None:
                    raise InvalidRequestError(error)
                return self._engine.gbnf_grammar(gbnf)
            return self._engine.json_schema_grammar(constraint.schema)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{constraint.field}: {exc.message}", field=constraint.field) from None

    def _check_logit_bias(self, options: RequestOptions) -> None:
        if not options.logit_bias or self._engine is None:
            return
        n_vocab = self._engine.metadata.vocab_size
        for token, _bias in options.logit_bias:
            if not 0 <= token < n_vocab:
                raise InvalidRequestError(
                    f"logit_bias names token {token}, outside the vocabulary (0 to {n_vocab - 1})",
                    field=f"{options.logit_bias_field}.{token}",
                )

    def _unavailable(self) -> str | None:
        """None when the local model can serve; else the echo fallback's reason. Raises when nothing can serve."""
        if self._state is State.DISABLED:
            raise NotReadyError("disabled", self._detail or "ENABLE_SMOLLM is false")
        if self.settings.provider is Provider.ECHO:
            return ""
        if self._state is State.OK and self._engine is not None:
            return None
        reason = self._detail or f"the model is {self._state.value}"
        if self._state is State.ERROR and self.settings.fallback is Fallback.ECHO:
            return reason
        retry = 5 if self._state is State.LOADING else None
        raise NotReadyError(self._state.value, reason, retry_after_s=retry)

    def _echo(self, text: str, fallback_reason: str, n: int = 1) -> Prepared:
        source = Source.ECHO if self.settings.provider is Provider.ECHO else Source.ECHO_FALLBACK
        return Prepared(
            source=source,
            prompt_tokens=len(text.split()),
            echo_text=text,
            fallback_reason=fallback_reason or None,
            n=n,
        )

    def _local(self, tokens: list[int], options: RequestOptions, echo_text: str) -> Prepared:
        n_ctx = self.settings.n_ctx if self._engine is None else self._engine.metadata.n_ctx
        prompt_tokens = len(tokens)
        # In the shared KV layout the choices share its n_ctx cells: the prompt's once, and an answer's each. With a
        # KV stream per sequence each choice has a whole window (see engine/kv_cache.py).
        shared = self._engine is not None and self._engine.metadata.kv_layout == KVLayout.SHARED.value
        answers = options.n if shared else 1
        if options.max_tokens is None:
            max_tokens = min(self.settings.max_tokens, (n_ctx - prompt_tokens) // answers)
            if max_tokens < 1:
                raise ContextLengthExceededError(prompt_tokens=prompt_tokens, max_tokens=answers, n_ctx=n_ctx)
        else:
            max_tokens = options.max_tokens
            if prompt_tokens + answers * max_tokens > n_ctx:
                raise ContextLengthExceededError(
                    prompt_tokens=prompt_tokens, max_tokens=answers * max_tokens, n_ctx=n_ctx
                )
        self._check_logit_bias(options)
        grammar = self._grammar(options.constraint)
        now = time.monotonic()
        job = GenerationJob(
            prompt_tokens=tuple(tokens),
            max_tokens=max_tokens,
            sampling=SamplingParams(
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
                min_p=options.min_p,
                repeat_penalty=options.repeat_penalty,
                frequency_penalty=options.frequency_penalty,
                presence_penalty=options.presence_penalty,
                logit_bias=options.logit_bias,
                seed=options.seed,
            ),
            stop=options.stop,
            grammar=grammar,
            logprobs=options.logprobs,
            n=options.n,
            deadline=now + self.settings.request_timeout_s,
        )
        return Prepared(
            source=Source.LOCAL, prompt_tokens=prompt_tokens, job=job, echo_text=echo_text, arrived_at=now, n=options.n
        )

    # --- admission ------------------------------------------------------------------------------------------

    def admit(self, places: int = 1) -> Ticket:
        """Take ``places`` in line (a request's ``n``: each choice runs as one of SMOLLM_PARALLEL's sequences), or
        raise QueueFullError at once with a Retry-After estimate."""
        return self._admission.admit(places)

    # --- running --------------------------------------------------------------------------------------------

    def open_stream(self, prepared: Prepared, *, live_text: bool = True) -> AsyncIterator[Chunk | Outcome]:
        """Admit the request (or raise QueueFullError at once) and return its stream of text chunks and outcome.

        With ``live_text=False`` (a caller that only wants the whole answer) each choice's text comes as one chunk
        just before the outcome, which spares the event loop a wake-up per token (see :mod:`innova_smollm.core.sinks`).
        A streamed answer yields, each time the consumer asks, all the text that arrived since it last asked, one
        chunk per choice: one write per decode step at most, and fewer, larger writes when the consumer is slower
        than the model.

        The place in line is released when the stream ends, is closed, or is dropped without ever being iterated
        (a client that vanished before the first byte), so admission can never leak.
        """
        ticket = self.admit(prepared.n)
        stream = self._stream(prepared, ticket, live_text)
        weakref.finalize(stream, ticket.release)
        return stream

    async def _stream(self, prepared: Prepared, ticket: Ticket, live_text: bool) -> AsyncIterator[Chunk | Outcome]:
        sink: AsyncSink | None = None
        answered = False
        try:
            if prepared.job is None:
                for index in range(prepared.n):
                    yield Chunk(prepared.echo_text, index)
                answered = True
                yield self._echo_outcome(prepared)
                return
            sink = AsyncSink(asyncio.get_running_loop(), live_text=live_text)
            assert self._engine is not None
            self._engine.submit(prepared.job, sink)
            collector = _Collector(prepared)
            pending: Event | None = None
            while True:
                event = pending or await self._next_async(sink, collector, prepared.job)
                pending = None
                result = self._apply(event, collector, prepared)
                if isinstance(result, Chunk):
                    # What else already arrived goes out with it, up to the next event that is not text.
                    texts = [result]
                    while (more := sink.get_nowait()) is not None:
                        if not isinstance(more, Text):
                            pending = more
                            break
                        collector.on_text(more.text, more.produced_at, more.choice)
                        texts.append(Chunk(more.text, more.choice, more.logprobs))
                    for chunk in joined_by_choice(texts):
                        yield chunk
                elif isinstance(result, Outcome):
                    if result.source is Source.ECHO_FALLBACK:
                        for choice in result.choices:
                            yield Chunk(choice.text, choice.index)
                    answered = True
                    yield result
                    return
        except (GeneratorExit, asyncio.CancelledError):
            # Closed or cancelled before the outcome was handed over: the client went away mid-request.
            if not answered:
                self._observer.on_cancelled()
            raise
        finally:
            if sink is not None:
                sink.cancel()
            ticket.release()

    async def _next_async(self, sink: AsyncSink, collector: _Collector, job: GenerationJob) -> Event:
        if collector.started:
            return await sink.get()
        # While queued, wait no longer than the request's deadline; the engine enforces it once generating.
        try:
            return await sink.get(timeout=max(0.0, job.deadline - time.monotonic()) + 0.5)
        except TimeoutError:
            raise RequestTimeoutError(self.settings.request_timeout_s) from None

    def run_blocking(self, prepared: Prepared) -> Outcome:
        """Run a prepared request to the end on the calling thread (in-process API, CLI)."""
        ticket = self.admit(prepared.n)
        sink = BlockingSink(live_text=False)
        try:
            if prepared.job is None:
                return self._echo_outcome(prepared)
            collector = _Collector(prepared)
            assert self._engine is not None
            self._engine.submit(prepared.job, sink)
            while True:
                timeout = None if collector.started else max(0.0, prepared.job.deadline - time.monotonic()) + 0.5
                try:
                    event = sink.get(timeout=timeout)
                except queue.Empty:
                    raise RequestTimeoutError(self.settings.request_timeout_s) from None
                result = self._apply(event, collector, prepared)
                if isinstance(result, Outcome):
                    return result
        finally:
            sink.cancel()
            ticket.release()

    def _apply(
        self, event: Started | Text | Finished | Failed, collector: _Collector, prepared: Prepared
    ) -> Chunk | Outcome | None:
        """One engine event: the text to pass on, the final outcome, or None. Raises on failure."""
        if isinstance(event, Started):
            collector.started = True
            collector.queue_s = event.queue_wait_s
            return None
        if isinstance(event, Text):
            collector.on_text(event.text, event.produced_at, event.choice)
            return Chunk(event.text, event.choice, event.logprobs)
        if isinstance(event, Finished):
            outcome = collector.finished(event.reason, event.completion_tokens, event.logprobs, event.choice)
            if outcome is None:
                return None  # other choices are still running
            self._admission.observe_duration(outcome.total_s)
            return self._observed(outcome)
        assert isinstance(event, Failed)
        return self._on_failure(event.error, collector, prepared)

    def _on_failure(self, error: Exception, collector: _Collector, prepared: Prepared) -> Outcome:
        if isinstance(error, ServiceError) and not isinstance(error, GenerationError):
            raise error
        message = error.message if isinstance(error, ServiceError) else f"generation failed: {error}"
        log.error("generation failed: %s", message, extra={"event": "generation_failed"})
        if self.settings.fallback is Fallback.ECHO and not collector.parts and prepared.job is not None:
            # Nothing was sent yet, so the caller can still get a whole answer, marked as the fallback's.
            fallback = Prepared(
                source=Source.ECHO_FALLBACK,
                prompt_tokens=prepared.prompt_tokens,
                echo_text=prepared.echo_text,
                fallback_reason=message,
                arrived_at=prepared.arrived_at,
                n=prepared.n,
            )
            return self._echo_outcome(fallback)
        raise GenerationError(message)

    def _echo_outcome(self, prepared: Prepared) -> Outcome:
        """The whole answer of the echo provider or fallback: the text it repeats (its words count as tokens), as
        each of the request's choices."""
        collector = _Collector(prepared)
        words = len(prepared.echo_text.split())
        for index in range(prepared.n):
            collector.on_text(prepared.echo_text, time.monotonic(), index)
            collector.finished(FinishReason.STOP, words, choice=index)
        return self._observed(collector.outcome())

    def _observed(self, outcome: Outcome) -> Outcome:
        self._observer.on_outcome(outcome)
        return outcome


def joined_by_choice(chunks: Sequence[Chunk]) -> list[Chunk]:
    """The chunks of each choice joined into one, in the order the choices first came."""
    by_choice: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        by_choice.setdefault(chunk.choice, []).append(chunk)
    joined = []
    for choice, parts in by_choice.items():
        logprobs = None
        if any(part.logprobs is not None for part in parts):
            logprobs = tuple(entry for part in parts for entry in part.logprobs or ())
        joined.append(Chunk("".join(part.text for part in parts), choice, logprobs))
    return joined


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content
