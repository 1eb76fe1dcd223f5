"""A new request takes the prompt prefix it shares with a *running* request from that request's cells (issue 21, the
first token): requests with one system prompt side by side, and the next turn of a chat whose previous answer is still
being decoded. Real engine, real model; both KV layouts."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from innova_smollm.core.types import ChatMessage, GenerationJob, SamplingParams
from innova_smollm.engine.saved_states import common_prefix_length
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.settings import KVLayout
from tests.integration.test_engine import PrefillCount, RecordingSink, _settings

SYSTEM = ChatMessage(
    role="system",
    content="You are the KORYXA assistant. You read a need described by a small business and propose up to three "
    "concrete actions, each with a short reason. Answer briefly, in plain words, and never invent figures.",
)
GREEDY = SamplingParams(temperature=0.0)
#: Greedy, and never the model's end tokens (<|endoftext|> 0, <|im_end|> 2): an answer that runs until cancelled.
ENDLESS = SamplingParams(temperature=0.0, logit_bias=((0, -100.0), (2, -100.0)))
#: How far the first answer token's log probabilities over copied cells may move from those decoded from nothing:
#: another batch shape moves the last bits of a logit (measured: at most 0.07 here), while a misplaced or stale cell
#: would give another distribution altogether. Near-ties make comparing the greedy text itself fragile.
LOGPROB_TOLERANCE = 0.3


@pytest.fixture(scope="module", params=[KVLayout.SHARED, KVLayout.PER_SEQUENCE])
def sharing(request: pytest.FixtureRequest) -> Iterator[GGUFEngine]:
    loaded = GGUFEngine(_settings(prompt_cache=True, parallel=2, n_ctx=1024, kv_layout=request.param))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def cold() -> Iterator[GGUFEngine]:
    loaded = GGUFEngine(_settings(prompt_cache=False, parallel=1, n_ctx=1024))
    yield loaded
    loaded.close()


class LogprobSink(RecordingSink):
    def finished(self, reason: object, completion_tokens: int, logprobs: object = None, choice: int = 0) -> None:
        self.logprobs = logprobs
        super().finished(reason, completion_tokens, logprobs, choice)  # type: ignore[arg-type]

    def first_token_top(self) -> dict[bytes, float]:
        assert isinstance(self.logprobs, list) and self.logprobs, self.logprobs
        return dict(self.logprobs[0].top)


def _chat_job(
    engine: GGUFEngine, messages: list[ChatMessage], sampling: SamplingParams, max_tokens: int
) -> GenerationJob:
    return GenerationJob(prompt_tokens=tuple(engine.tokenize_chat(messages)), max_tokens=max_tokens, sampling=sampling)


def _running(engine: GGUFEngine, job: GenerationJob, *, chunks: int = 8) -> RecordingSink:
    """Submit ``job`` and return once it has produced ``chunks`` pieces of its answer: it is running."""
    sink = RecordingSink()
    engine.submit(job, sink)
    deadline = time.monotonic() + 120
    while len(sink.chunks) < chunks:
        assert sink.error is None and sink.reason is None, (sink.error, sink.reason)
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.01)
    return sink


def _clear(engine: GGUFEngine) -> None:
    """Forget every cached prefix, so a test sees only what it ran itself."""
    for _ in range(2):
        sinks = [RecordingSink(), RecordingSink()]
        for index, sink in enumerate(sinks):
            engine.submit(_chat_job(engine, [ChatMessage(role="user", content=f"Say {index}.")], GREEDY, 2), sink)
        for sink in sinks:
            sink.wait()


def test_a_request_with_the_system_prompt_of_a_running_one_takes_its_cells(
    sharing: GGUFEngine, cold: GGUFEngine
) -> None:
    _clear(sharing)
    first = _running(
        sharing, _chat_job(sharing, [SYSTEM, ChatMessage(role="user", content="Count to 900.")], ENDLESS, 600)
    )
    question = [SYSTEM, ChatMessage(role="user", content="We bake bread and want more customers.")]
    second = _chat_job(sharing, question, GREEDY, 12)
    shared = common_prefix_length(second.prompt_tokens, _chat_job(sharing, [SYSTEM], GREEDY, 1).prompt_tokens)
    assert shared > 40
    count, copied = PrefillCount(sharing), sharing.prefixes_copied
    try:
        answer = LogprobSink()
        sharing.submit(dataclasses.replace(second, logprobs=5), answer)
        answer.wait()
    finally:
        first.cancel()
        first.wait()
    assert sharing.prefixes_copied == copied + 1
    assert count.reused >= shared
    alone = LogprobSink()
    cold.submit(dataclasses.replace(_chat_job(cold, question, GREEDY, 12), logprobs=5), alone)
    alone.wait()
    assert answer.error is None and alone.error is None
    copied_top, expected_top = answer.first_token_top(), alone.first_token_top()
    both = copied_top.keys() & expected_top.keys()
    assert len(both) >= 4, (copied_top, expected_top)
    assert all(abs(copied_top[token] - expected_top[token]) < LOGPROB_TOLERANCE for token in both), (
        copied_top,
        expected_top,
    )


@pytest.mark.parametrize("client_left", [False, True], ids=["still-running", "client-left"])
def test_the_next_turn_of_a_chat_whose_answer_is_still_running_decodes_only_the_new_turn(
    sharing: GGUFEngine, client_left: bool
) -> None:
    _clear(sharing)
    question = [ChatMessage(role="user", content="Tell me a long story about a baker.")]
    turn_one = _chat_job(sharing, question, ENDLESS, 600)
    first = _running(sharing, turn_one)
    conversation = [
        *question,
        ChatMessage(role="assistant", content=first.answer),
        ChatMessage(role="user", content="Why did she bake?"),
    ]
    turn_two = _chat_job(sharing, conversation, GREEDY, 8)
    count = PrefillCount(sharing)
    if client_left:
        first.cancel()  # the client read enough, left, and asked its next turn at once
    second = RecordingSink()
    sharing.submit(turn_two, second)
    try:
        assert second.wait().error is None
    finally:
        first.cancel()
        first.wait()
    assert count.reused >= len(turn_one.prompt_tokens), "the first turn's prompt should not be decoded again"
    assert count.prefilled < len(turn_two.prompt_tokens) - len(turn_one.prompt_tokens)
