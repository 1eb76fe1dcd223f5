"""LoopInbox, the sinks and the service's stream: events cross from the engine thread to an event loop in order,
one wake-up per burst, and a stream writes what accumulated since its last write as one chunk."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from innova_smollm.core.service import Chunk, ModelService, Outcome, Prepared, RequestOptions, Source
from innova_smollm.core.sinks import (
    AsyncSink,
    BlockingSink,
    Failed,
    Finished,
    LoopInbox,
    Started,
    Text,
    inbox_of,
)
from innova_smollm.core.types import ChatMessage, FinishReason, GenerationJob, TokenLogprob, TokenSink
from innova_smollm.errors import InvalidRequestError
from innova_smollm.settings import Settings


def test_a_burst_posted_before_the_loop_runs_costs_one_wake_up_and_keeps_its_order() -> None:
    async def scenario() -> tuple[list[object], LoopInbox]:
        loop = asyncio.get_running_loop()
        sinks = [AsyncSink(loop) for _ in range(4)]
        # Posted from another thread while this loop is busy (not awaiting): the whole burst is pending at once.
        poster = threading.Thread(
            target=lambda: [sink.text(f"token {index}") for index, sink in enumerate(sinks) for _ in range(2)]
        )
        poster.start()
        poster.join()
        received = [await sink.get(timeout=5) for sink in sinks for _ in range(2)]
        return received, inbox_of(loop)

    received, inbox = asyncio.run(scenario())
    assert [event.text for event in received if isinstance(event, Text)] == [
        f"token {index}" for index in range(4) for _ in range(2)
    ]
    assert (inbox.posted, inbox.wakeups) == (8, 1)


def test_events_after_a_drain_wake_the_loop_again() -> None:
    async def scenario() -> LoopInbox:
        loop = asyncio.get_running_loop()
        sink = AsyncSink(loop)
        for round_ in range(3):
            await asyncio.to_thread(sink.text, f"round {round_}")
            received = await sink.get(timeout=5)
            assert isinstance(received, Text) and received.text == f"round {round_}"
        await asyncio.to_thread(sink.finished, FinishReason.STOP, 3)
        assert await sink.get(timeout=5) == Finished(FinishReason.STOP, 3)
        return inbox_of(loop)

    inbox = asyncio.run(scenario())
    assert (inbox.posted, inbox.wakeups) == (4, 4)


def test_a_closed_loop_cancels_the_job_instead_of_raising_into_the_engine() -> None:
    loop = asyncio.new_event_loop()
    sink = AsyncSink(loop)
    loop.close()
    sink.text("nobody is listening")
    assert sink.cancelled()


def test_every_sink_of_a_closed_loop_learns_it_not_only_the_first() -> None:
    loop = asyncio.new_event_loop()
    sinks = [AsyncSink(loop) for _ in range(3)]
    loop.close()
    for sink in sinks:
        sink.text("nobody is listening")
    assert [sink.cancelled() for sink in sinks] == [True, True, True]


def drained(sink: BlockingSink) -> list[object]:
    events: list[object] = []
    while True:
        try:
            events.append(sink.get(timeout=0))
        except queue.Empty:
            return events


def test_held_text_arrives_as_one_chunk_before_the_end_stamped_with_its_first_token() -> None:
    sink = BlockingSink(live_text=False)
    sink.started()
    before = time.monotonic()
    sink.text("Once")
    after = time.monotonic()
    sink.text(" upon")
    sink.text(" a time")
    assert [type(event) for event in drained(sink)] == [Started]  # nothing else until the end
    sink.finished(FinishReason.LENGTH, 3)
    text, finished = drained(sink)
    assert isinstance(text, Text) and text.text == "Once upon a time"
    assert before <= text.produced_at <= after
    assert finished == Finished(FinishReason.LENGTH, 3)


def test_held_text_is_handed_over_before_a_failure_and_no_empty_chunk_is_made() -> None:
    failing = BlockingSink(live_text=False)
    failing.text("partial")
    error = RuntimeError("decode failed")
    failing.failed(error)
    text, failed = drained(failing)
    assert isinstance(text, Text) and text.text == "partial"
    assert failed == Failed(error)

    silent = BlockingSink(live_text=False)
    silent.finished(FinishReason.STOP, 0)
    assert drained(silent) == [Finished(FinishReason.STOP, 0)]


def test_live_text_is_posted_chunk_by_chunk() -> None:
    sink = BlockingSink()
    sink.text("a")
    sink.text("b")
    sink.finished(FinishReason.STOP, 2)
    events = drained(sink)
    assert [event.text for event in events if isinstance(event, Text)] == ["a", "b"]
    assert events[-1] == Finished(FinishReason.STOP, 2)


class BurstEngine:
    """Pure logic around the service: an engine that answers every job with a burst of chunks at once, as a decode
    step of several sequences or a consumer slower than the model leaves them waiting."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    def submit(self, job: GenerationJob, sink: TokenSink) -> None:
        sink.started()
        for chunk in self.chunks:
            sink.text(chunk)
        sink.finished(FinishReason.LENGTH, len(self.chunks))


def streamed(chunks: list[str]) -> list[Chunk | Outcome]:
    settings = Settings.from_env({})
    service = ModelService(settings, engine=BurstEngine(chunks))  # type: ignore[arg-type]
    job = GenerationJob(prompt_tokens=(1, 2), max_tokens=len(chunks))
    prepared = Prepared(source=Source.LOCAL, prompt_tokens=2, job=job)

    async def scenario() -> list[Chunk | Outcome]:
        return [item async for item in service.open_stream(prepared)]

    return asyncio.run(scenario())


def test_a_stream_sends_what_arrived_since_its_last_write_as_one_chunk() -> None:
    *texts, outcome = streamed(["Once", " upon", " a", " time"])
    assert texts == [Chunk("Once upon a time")]
    assert isinstance(outcome, Outcome)
    assert (outcome.text, outcome.completion_tokens) == ("Once upon a time", 4)


def test_a_stream_of_one_chunk_per_wake_up_sends_each_as_it_comes() -> None:
    async def scenario() -> list[Chunk | Outcome]:
        loop = asyncio.get_running_loop()
        service = ModelService(Settings.from_env({}), engine=ThreadedEngine(loop))  # type: ignore[arg-type]
        job = GenerationJob(prompt_tokens=(1,), max_tokens=3)
        prepared = Prepared(source=Source.LOCAL, prompt_tokens=1, job=job)
        return [item async for item in service.open_stream(prepared)]

    *texts, outcome = asyncio.run(scenario())
    assert texts == [Chunk("a"), Chunk("b"), Chunk("c")]
    assert isinstance(outcome, Outcome) and outcome.text == "abc"


class ThreadedEngine:
    """Chunks from another thread, each posted only after the loop took the previous one (a slow model)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def submit(self, job: GenerationJob, sink: TokenSink) -> None:
        def run() -> None:
            sink.started()
            for chunk in "abc":
                sink.text(chunk)
                self._wait_for_the_loop()
            sink.finished(FinishReason.LENGTH, 3)

        threading.Thread(target=run, daemon=True).start()

    def _wait_for_the_loop(self) -> None:
        """Return once the loop has run everything posted so far (the chunk included) and one turn more."""
        drained = threading.Event()
        self.loop.call_soon_threadsafe(lambda: self.loop.call_soon(drained.set))
        drained.wait(5)


def entry(token: str) -> TokenLogprob:
    return TokenLogprob(token=token.encode(), logprob=-1.0)


class ChoicesEngine:
    """An engine that answers a job of ``n`` choices in one burst, the choices' tokens interleaved as a decode step
    of several sequences leaves them, each text with its tokens' log probabilities."""

    def submit(self, job: GenerationJob, sink: TokenSink) -> None:
        sink.started()
        for token in ("A", "B", "C"):
            for choice in range(job.n):
                text = f"{token}{choice}"
                sink.text(text, [entry(text)], choice)
        for choice in range(job.n):
            sink.finished(FinishReason.LENGTH, 3, [entry(f"{t}{choice}") for t in "ABC"], choice)


def test_a_stream_of_several_choices_sends_one_chunk_per_choice_with_its_tokens_log_probabilities() -> None:
    service = ModelService(Settings.from_env({"SMOLLM_PARALLEL": "3"}), engine=ChoicesEngine())  # type: ignore[arg-type]
    job = GenerationJob(prompt_tokens=(1, 2), max_tokens=3, n=3, logprobs=0)
    prepared = Prepared(source=Source.LOCAL, prompt_tokens=2, job=job, n=3)

    async def scenario() -> list[Chunk | Outcome]:
        return [item async for item in service.open_stream(prepared)]

    *chunks, outcome = asyncio.run(scenario())
    assert [(chunk.choice, chunk.text) for chunk in chunks] == [(0, "A0B0C0"), (1, "A1B1C1"), (2, "A2B2C2")]
    for chunk in chunks:
        assert chunk.logprobs is not None and b"".join(e.token for e in chunk.logprobs).decode() == chunk.text
    assert isinstance(outcome, Outcome)
    assert [(choice.index, choice.text) for choice in outcome.choices] == [(0, "A0B0C0"), (1, "A1B1C1"), (2, "A2B2C2")]
    # The prompt once, the answers' tokens all.
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.text) == (2, 9, "A0B0C0")
    # Speeds are a sequence's: the three choices decoded side by side, three tokens each.
    assert outcome.decoded_tokens == 3
    assert service.in_flight == 0


def test_held_text_is_held_by_choice() -> None:
    sink = BlockingSink(live_text=False)
    sink.text("a", None, 0)
    sink.text("x", None, 1)
    sink.text("b", None, 0)
    sink.finished(FinishReason.STOP, 2, None, 1)
    assert [(type(e).__name__, getattr(e, "choice", None)) for e in drained(sink)] == [("Text", 1), ("Finished", 1)]
    sink.finished(FinishReason.LENGTH, 2, None, 0)
    text, finished = drained(sink)
    assert isinstance(text, Text) and (text.text, text.choice) == ("ab", 0)
    assert finished == Finished(FinishReason.LENGTH, 2, None, 0)


def test_the_echo_provider_answers_each_choice_with_the_echo() -> None:
    service = ModelService(Settings.from_env({"PROVIDER": "echo"}))
    prepared = service.prepare_chat([ChatMessage(role="user", content="hi there")], RequestOptions(n=2))
    outcome = service.run_blocking(prepared)
    assert [(choice.index, choice.text) for choice in outcome.choices] == [(0, "hi there"), (1, "hi there")]
    assert outcome.completion_tokens == 4 and service.in_flight == 0
    with pytest.raises(InvalidRequestError) as refused:
        service.prepare_chat([ChatMessage(role="user", content="hi")], RequestOptions(n=5))
    assert refused.value.field == "n" and "SMOLLM_PARALLEL=4" in refused.value.message
