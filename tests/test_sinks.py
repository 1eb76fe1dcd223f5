"""LoopInbox and AsyncSink: events cross from a plain thread to an event loop in order, one wake-up per burst."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from innova_smollm.generation import FinishReason
from innova_smollm.sinks import (
    AsyncSink,
    BlockingSink,
    DirectText,
    Event,
    Failed,
    Finished,
    LoopInbox,
    Started,
    Text,
    Unsent,
    inbox_of,
)


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


class ScriptedWriter:
    """A socket that takes whole chunks until told otherwise (the real one is in test_socket_writer.py)."""

    def __init__(self, *, full_after: int | None = None, gone_after: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.full_after, self.gone_after = full_after, gone_after

    def write_chunk(self, payload: bytes) -> bytes:
        if self.gone_after is not None and len(self.chunks) >= self.gone_after:
            raise BrokenPipeError("the client went away")
        if self.full_after is not None and len(self.chunks) >= self.full_after:
            return payload[1:]  # took only the first byte
        self.chunks.append(payload)
        return b""

    def write_on_loop(self, data: bytes) -> None:
        raise AssertionError("the sink never writes on the loop itself")

    def close(self) -> None:
        pass


def direct_run(writer: ScriptedWriter, texts: list[str]) -> tuple[list[Event], bool]:
    """Feed ``texts`` then Finished through a direct AsyncSink; the events the loop received, and if it cancelled."""

    async def scenario() -> tuple[list[Event], bool]:
        sink = AsyncSink(asyncio.get_running_loop(), direct=DirectText(str.encode, writer))
        for text in texts:
            sink.text(text)
        sink.finished(FinishReason.LENGTH, len(texts))
        events = [await sink.get(timeout=5)]
        while not isinstance(events[-1], Finished):
            events.append(await sink.get(timeout=5))
        return events, sink.cancelled()

    return asyncio.run(scenario())


def test_direct_text_is_written_by_the_engine_thread_and_reaches_the_loop_only_for_the_outcome() -> None:
    writer = ScriptedWriter()
    events, cancelled = direct_run(writer, ["Once", " upon", " a time"])
    assert writer.chunks == [b"Once", b" upon", b" a time"]
    delivered, finished = events
    assert isinstance(delivered, Text) and (delivered.text, delivered.delivered) == ("Once upon a time", True)
    assert finished == Finished(FinishReason.LENGTH, 3) and not cancelled


def test_a_full_socket_hands_the_rest_of_the_answer_to_the_loop_in_order() -> None:
    writer = ScriptedWriter(full_after=2)
    events, cancelled = direct_run(writer, ["a", "b", "cde", "f"])
    assert writer.chunks == [b"a", b"b"]
    delivered, unsent, live, finished = events
    # "cde" was partly written: it counts as delivered, and the loop writes the two bytes the socket did not take.
    assert isinstance(delivered, Text) and (delivered.text, delivered.delivered) == ("abcde", True)
    assert isinstance(unsent, Unsent) and unsent.data == b"de"
    assert isinstance(live, Text) and (live.text, live.delivered) == ("f", False)
    assert finished == Finished(FinishReason.LENGTH, 4) and not cancelled


def test_a_gone_client_cancels_the_job_and_the_engine_thread_writes_no_more() -> None:
    writer = ScriptedWriter(gone_after=1)
    events, cancelled = direct_run(writer, ["a", "b", "c"])
    assert cancelled and writer.chunks == [b"a"]
    # The text made so far still reaches the outcome; what comes before the cancel lands goes the loop's way.
    texts = [(event.text, event.delivered) for event in events if isinstance(event, Text)]
    assert texts == [("ab", True), ("c", False)]
