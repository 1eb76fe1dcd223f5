"""GGUFEngine against the real model and the real llama.cpp: several sequences in one batch stay correct.

How answers are compared, and why not "alone == in a batch" token for token: measured on the logits, a sequence's
results never depend on the *content* of the other sequences (changing a batch-mate's prompt leaves its logits
bit-identical: the KV cache and attention masks do not leak), and a prompt prefilled in the first row of a batch gets
bit-identical logits to the same prompt alone. But llama.cpp multiplies a batch of several tokens with other kernels
and tiles than a single token, in another summation order; this small quantized model turns that into logit changes
of up to about 1.2 (flash attention on vs off, alone, already moves them by 0.36), which flips greedy choices at
near-ties, e.g. the capital-of-France prompt ("L" 25.10 vs "The" 24.86) and later tokens of long answers. So:
- exact, token for token: a sequence's answer is the same whatever its batch-mates say, for batches of one shape;
- prefix: when a batch-mate is cancelled (the batch changes shape) the others agree with the uncancelled run;
- prefix: the first sequence of a batch of four agrees with its alone answer over the first words (its prompt
  logits are identical; the first decode steps rarely meet a near-tie), for each prompt in turn.
Batches are made deterministic by holding the engine thread in the first job's ``started`` callback until the other
jobs are queued, so all four are admitted in the same step.

Flash attention: these engines run with it on (``SMOLLM_FLASH_ATTN=on``, also what ``auto`` picks for this engine),
which computes each query row's attention on its own, so the only batch effect left is in the weight products and a
mistake of ours in positions, sequence ids or cache cells shows up as a real difference. With it off, the attention
product is batched too, answers flip at near-ties a few tokens earlier, and
``test_with_flash_attention_off_a_batch_answers_like_alone`` checks that configuration with a shorter prefix.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from innova_smollm.core.types import ChatMessage, FinishReason, GenerationJob, SamplingParams
from innova_smollm.engine.sampling import LogitRows
from innova_smollm.engine.saved_states import SavedState, common_prefix_length
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.errors import ContextLengthExceededError, GenerationError, NotReadyError, RequestTimeoutError
from innova_smollm.settings import FlashAttention, KVLayout, Settings
from tests.servers import wait_until

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three fruits.",
)
GREEDY = SamplingParams(temperature=0.0)
WAIT_S = 120.0
#: How far the first sequence of a batch must agree with its alone answer (see the module docstring).
AGREED_PREFIX_CHARS = 16


def _common_prefix(first: str, second: str) -> int:
    pairs = enumerate(zip(first, second, strict=False))
    return next((index for index, (a, b) in pairs if a != b), min(len(first), len(second)))


class RecordingSink:
    """Collects one job's events; thread-safe because the engine thread writes while the test thread reads."""

    def __init__(self, *, cancel_after_chunks: int | None = None) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._cancel_after = cancel_after_chunks
        self.chunks: list[str] = []
        self.started_count = 0
        self.started_at = self.finished_at = float("nan")
        self.reason: FinishReason | None = None
        self.completion_tokens: int | None = None
        self.error: Exception | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def started(self) -> None:
        with self._lock:
            self.started_count += 1
            self.started_at = time.monotonic()

    def text(self, chunk: str, logprobs: object = None, choice: int = 0) -> None:
        with self._lock:
            self.chunks.append(chunk)
            if self._cancel_after is not None and len(self.chunks) >= self._cancel_after:
                self._cancel.set()

    def finished(self, reason: FinishReason, completion_tokens: int, logprobs: object = None, choice: int = 0) -> None:
        with self._lock:
            self.reason, self.completion_tokens = reason, completion_tokens
            self.finished_at = time.monotonic()
        self._done.set()

    def failed(self, error: Exception) -> None:
        with self._lock:
            self.error = error
        self._done.set()

    def wait(self) -> RecordingSink:
        assert self._done.wait(WAIT_S), "the engine never ended this job"
        return self

    @property
    def answer(self) -> str:
        with self._lock:
            return "".join(self.chunks)


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "model_path": MODEL,
        "n_threads": 2,
        "n_ctx": 2048,
        "parallel": 4,
        "flash_attn": FlashAttention.ON,
        # Pinned: ``auto`` would pick per_sequence for this small model, and the per_sequence tests set it.
        "kv_layout": KVLayout.SHARED,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine() -> Iterator[GGUFEngine]:
    if not MODEL.is_file():
        pytest.fail(f"{MODEL} is missing: run `python3 scripts/fetch_model.py` (scripts/dev does it)")
    # Without the prompt cache every run prefills its whole prompt, so the batch shapes the exact comparisons
    # below depend on do not change with what ran before; the cache has its own tests at the end.
    loaded = GGUFEngine(_settings(prompt_cache=False))
    yield loaded
    loaded.close()


def _job(engine: GGUFEngine, prompt: str, **fields: object) -> GenerationJob:
    values: dict[str, object] = {"max_tokens": 48, "sampling": GREEDY}
    values.update(fields)
    tokens = tuple(engine.tokenize_chat([ChatMessage(role="user", content=prompt)]))
    return GenerationJob(prompt_tokens=tokens, **values)  # type: ignore[arg-type]


def _run(
    engine: GGUFEngine, jobs: list[GenerationJob], sinks: list[RecordingSink] | None = None
) -> list[RecordingSink]:
    sinks = sinks or [RecordingSink() for _ in jobs]
    for job, sink in zip(jobs, sinks, strict=True):
        engine.submit(job, sink)
    return [sink.wait() for sink in sinks]


class GateSink(RecordingSink):
    """Holds the engine thread when its job starts, until ``open`` is called: the jobs queued meanwhile are then
    admitted together with it, in one step, in submission order."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._gate = threading.Event()

    def open(self) -> None:
        self._gate.set()

    def started(self) -> None:
        self._gate.wait(WAIT_S)
        super().started()


def _run_together(
    engine: GGUFEngine, jobs: list[GenerationJob], others: list[RecordingSink] | None = None
) -> list[RecordingSink]:
    """Run jobs admitted in one step, in this order (the first one in the first row of every batch)."""
    gate = GateSink()
    sinks: list[RecordingSink] = [gate, *(others or [RecordingSink() for _ in jobs[1:]])]
    engine.submit(jobs[0], gate)
    deadline = time.monotonic() + WAIT_S
    while engine._inbox.qsize() and time.monotonic() < deadline:  # the engine thread has taken the first job
        time.sleep(0.001)
    for job, sink in zip(jobs[1:], sinks[1:], strict=True):
        engine.submit(job, sink)
    gate.open()
    return [sink.wait() for sink in sinks]


@pytest.fixture(scope="module")
def alone(engine: GGUFEngine) -> list[RecordingSink]:
    """Each prompt's greedy answer when it is the only sequence in the engine."""
    return [_run(engine, [_job(engine, prompt)])[0] for prompt in PROMPTS]


def test_metadata_reports_parallel_and_full_window(engine: GGUFEngine) -> None:
    assert engine.metadata.parallel == 4
    assert engine.metadata.n_ctx == 2048


@pytest.mark.parametrize("first", range(len(PROMPTS)))
def test_first_sequence_of_a_batch_of_four_starts_like_the_alone_answer(
    engine: GGUFEngine, alone: list[RecordingSink], first: int
) -> None:
    order = [first, *(index for index in range(len(PROMPTS)) if index != first)]
    sinks = _run_together(engine, [_job(engine, PROMPTS[index]) for index in order])
    assert all(sink.error is None and sink.reason is not None for sink in sinks)
    assert _common_prefix(sinks[0].answer, alone[first].answer) >= min(AGREED_PREFIX_CHARS, len(alone[first].answer))


def test_an_answer_does_not_depend_on_what_the_batch_mates_say(engine: GGUFEngine) -> None:
    # Same-length prompts and answers cut by max_tokens keep the batch shape identical between the two runs.
    mates_a = tuple(f"Write a long story about a {animal}." for animal in ("cat", "dog", "fox"))
    mates_b = tuple(f"Write a long story about a {animal}." for animal in ("cow", "pig", "bee"))
    lengths = [len(_job(engine, prompt).prompt_tokens) for prompt in (*mates_a, *mates_b)]
    assert lengths[:3] == lengths[3:], "the two sets of batch-mates must tokenize to the same lengths"
    subject = _job(engine, "Write a long story about a horse.", max_tokens=24)
    run_a = _run_together(engine, [subject, *(_job(engine, p, max_tokens=24) for p in mates_a)])
    run_b = _run_together(engine, [subject, *(_job(engine, p, max_tokens=24) for p in mates_b)])
    assert all(sink.reason is FinishReason.LENGTH for sink in (*run_a, *run_b)), "a mate stopped early: shape changed"
    assert run_a[0].answer == run_b[0].answer
    assert run_a[1].answer != run_b[1].answer  # the mates really said different things


def test_staggered_arrivals_join_a_running_batch(engine: GGUFEngine, alone: list[RecordingSink]) -> None:
    sinks = [RecordingSink() for _ in PROMPTS]
    for prompt, sink in zip(PROMPTS, sinks, strict=True):
        engine.submit(_job(engine, prompt), sink)
        time.sleep(0.05)  # the next job arrives while the previous ones are already decoding
    for sink in sinks:
        assert sink.wait().error is None
        assert sink.reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert sink.answer.strip()
    assert _common_prefix(sinks[0].answer, alone[0].answer) >= min(AGREED_PREFIX_CHARS, len(alone[0].answer))


def test_cancelling_one_sequence_leaves_the_others_running(engine: GGUFEngine) -> None:
    # Not token-exact against an uncancelled run: the batch shrinks from four tokens per step to three, which
    # changes the kernels (module docstring). The others must still run to their own end and say the same thing.
    jobs = [_job(engine, prompt) for prompt in PROMPTS]
    reference = _run_together(engine, jobs)
    results = _run_together(engine, jobs, [RecordingSink(), RecordingSink(), RecordingSink(cancel_after_chunks=3)])
    cancelled = results[3]
    assert cancelled.reason is FinishReason.CANCELLED
    assert cancelled.completion_tokens is not None and 3 <= cancelled.completion_tokens < 48
    assert reference[3].answer.startswith(cancelled.answer)
    for index in range(3):
        assert results[index].error is None
        assert results[index].reason in (FinishReason.STOP, FinishReason.LENGTH)
        agreed = _common_prefix(results[index].answer, reference[index].answer)
        assert agreed >= min(AGREED_PREFIX_CHARS, len(reference[index].answer))


def test_max_tokens_ends_with_length(engine: GGUFEngine) -> None:
    sink = _run(engine, [_job(engine, PROMPTS[2], max_tokens=5)])[0]
    assert (sink.reason, sink.completion_tokens) == (FinishReason.LENGTH, 5)


def test_stop_string_cuts_the_answer_before_it(engine: GGUFEngine, alone: list[RecordingSink]) -> None:
    full = alone[2].answer
    words = full.split()
    stop = words[len(words) // 2]
    expected = full[: full.index(stop)]
    sinks = _run_together(engine, [_job(engine, PROMPTS[2], stop=(stop,)), _job(engine, PROMPTS[0])])
    assert (sinks[0].answer, sinks[0].reason) == (expected, FinishReason.STOP)
    assert sinks[1].error is None


def test_deadline_during_generation_ends_with_timeout(engine: GGUFEngine) -> None:
    # A prompt the model continues for as long as it may (it counts), so only the deadline can end it, however
    # fast the machine decodes.
    counting = tuple(engine.tokenize("Count from 1 to 1000: 1, 2, 3, 4,"))
    job = GenerationJob(prompt_tokens=counting, max_tokens=1500, sampling=GREEDY, deadline=time.monotonic() + 0.5)
    started = time.monotonic()
    sink = _run(engine, [job])[0]
    assert sink.reason is FinishReason.TIMEOUT
    assert time.monotonic() - started < 30


def test_deadline_passed_in_the_queue_fails_without_running(engine: GGUFEngine) -> None:
    sink = _run(engine, [_job(engine, PROMPTS[0], deadline=time.monotonic() - 1)])[0]
    assert isinstance(sink.error, RequestTimeoutError)
    assert sink.started_count == 0


def test_seeded_sampling_repeats_alone_and_in_a_batch(engine: GGUFEngine) -> None:
    sampled = SamplingParams(temperature=0.9, seed=1234)
    first = _run(engine, [_job(engine, PROMPTS[1], sampling=sampled)])[0]
    together = _run_together(engine, [_job(engine, PROMPTS[1], sampling=sampled), _job(engine, PROMPTS[3])])[0]
    assert first.answer == together.answer


def test_the_in_place_argmax_picks_what_llamas_greedy_sampler_picks(model_path: Path) -> None:
    # Greedy jobs without penalties skip llama.cpp's sampler chain (engine.batched.LogitRows): every row of a real
    # decode must give the chain's token, and a tie must go to the first token, as the chain's greedy does.
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    rows = LogitRows(llm.ctx, llm.n_vocab())
    try:
        for prompts in (PROMPTS, PROMPTS[::-1]):
            # The second decode writes new logits where the arrays kept from the first one look: they must read the
            # new values, not what was there when they were made.
            llm.reset()
            tokens = llm.tokenize(" ".join(prompts).encode())
            llm.eval(tokens)
            picks = [rows.highest(row) for row in range(len(tokens))]
            assert picks == [llama_cpp.llama_sampler_sample(chain, llm.ctx, row) for row in range(len(tokens))]
            assert len(set(picks)) > 3  # the rows differ: a wrong row or stride would show

        row_type = ctypes.c_float * llm.n_vocab()
        logits = row_type.from_address(ctypes.addressof(llama_cpp.llama_get_logits_ith(llm.ctx, 0).contents))
        top = max(logits)
        logits[7], logits[900] = top + 1, top + 1
        assert rows.highest(0) == 7 == llama_cpp.llama_sampler_sample(chain, llm.ctx, 0)

        with pytest.raises(GenerationError, match="no logits for batch row 9999"):
            rows.highest(9999)
    finally:
        llama_cpp.llama_sampler_free(chain)
        llm.close()


def test_a_job_larger_than_the_context_is_refused(engine: GGUFEngine) -> None:
    # The service refuses this before submitting; the engine still guards its KV cache against other callers.
    sink = _run(engine, [_job(engine, PROMPTS[0], max_tokens=engine.metadata.n_ctx)])[0]
    assert isinstance(sink.error, ContextLengthExceededError)


def test_a_job_waits_for_kv_cells_then_runs(engine: GGUFEngine) -> None:
    # Two jobs that each reserve most of the window cannot share it: the second starts once the first has left.
    short = "What is 2 plus 2?"  # answered in a dozen tokens, well before max_tokens
    big = engine.metadata.n_ctx - len(_job(engine, short).prompt_tokens) - 10
    sinks = _run(engine, [_job(engine, short, max_tokens=big), _job(engine, short, max_tokens=big)])
    # Each ran alone in the engine, so both give the same answer.
    assert sinks[0].answer == sinks[1].answer
    assert sinks[0].reason is FinishReason.STOP
    assert sinks[1].started_at >= sinks[0].finished_at


def test_close_fails_queued_and_running_jobs_with_not_ready() -> None:
    engine = GGUFEngine(_settings(parallel=1, n_threads=1))
    running, *queued = sinks = [RecordingSink() for _ in range(3)]
    for sink in sinks:
        engine.submit(_job(engine, PROMPTS[2], max_tokens=1500), sink)
    deadline = time.monotonic() + WAIT_S
    while not running.chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    for sink in queued:
        assert isinstance(sink.wait().error, NotReadyError)
        assert sink.started_count == 0
    assert isinstance(running.wait().error, NotReadyError) or running.reason is FinishReason.STOP
    late = RecordingSink()
    engine.submit(_job_tokens((1, 2, 3)), late)
    assert isinstance(late.wait().error, NotReadyError)


def _job_tokens(tokens: tuple[int, ...]) -> GenerationJob:
    return GenerationJob(prompt_tokens=tokens, max_tokens=4, sampling=GREEDY)


@pytest.mark.parametrize("parallel", [1, 2])
def test_one_engine_serves_every_parallel_setting(parallel: int) -> None:
    from innova_smollm.engine import load_engine

    loaded = load_engine(_settings(parallel=parallel))
    try:
        assert isinstance(loaded, GGUFEngine)
        assert loaded.metadata.parallel == parallel
        sink = RecordingSink()
        loaded.submit(_job_tokens(tuple(loaded.tokenize("Hello"))), sink)
        assert sink.wait().reason is FinishReason.LENGTH
        assert sink.answer
    finally:
        loaded.close()


# --- the prompt cache -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached() -> Iterator[GGUFEngine]:
    loaded = GGUFEngine(_settings(prompt_cache=True, parallel=2, n_ctx=1024))
    yield loaded
    loaded.close()


class PrefillCount:
    """Prompt tokens the engine took from its cache and decoded, from now on."""

    def __init__(self, engine: GGUFEngine) -> None:
        self._engine = engine
        self._reused, self._prefilled = engine.prompt_tokens_reused, engine.prompt_tokens_prefilled

    @property
    def reused(self) -> int:
        return self._engine.prompt_tokens_reused - self._reused

    @property
    def prefilled(self) -> int:
        return self._engine.prompt_tokens_prefilled - self._prefilled


def _cells_add_up(engine: GGUFEngine) -> bool:
    """With nothing running, every cell is either free or held by an idle sequence's cached tokens."""
    held = sum(len(tokens) for tokens in engine._idle.values())
    return not engine._running and engine._free_cells + held == engine._total_cells


def test_a_repeated_prompt_decodes_only_its_last_token(cached: GGUFEngine) -> None:
    job = _job(cached, PROMPTS[1])
    first = _run(cached, [job])[0]
    count = PrefillCount(cached)
    again = _run(cached, [_job(cached, PROMPTS[1])])[0]
    assert (count.reused, count.prefilled) == (len(job.prompt_tokens) - 1, 1)
    # The last prompt token is decoded alone instead of at the end of a prefill batch: other kernels (module
    # docstring), so the answers agree over their first words rather than token for token.
    assert _common_prefix(again.answer, first.answer) >= min(AGREED_PREFIX_CHARS, len(first.answer))
    assert _cells_add_up(cached)


def test_a_new_question_reuses_the_shared_template_prefix(cached: GGUFEngine) -> None:
    _run(cached, [_job(cached, PROMPTS[0])])
    asked = _job(cached, PROMPTS[3])
    shared = _common_prefix(_job(cached, PROMPTS[0]).prompt_tokens, asked.prompt_tokens)
    assert shared > 5, "the chat template should give both prompts a common start"
    count = PrefillCount(cached)
    answer = _run(cached, [asked])[0]
    assert (count.reused, count.prefilled) == (shared, len(asked.prompt_tokens) - shared)
    assert answer.error is None and answer.answer.strip()


def test_a_follow_up_turn_decodes_only_the_new_message(cached: GGUFEngine) -> None:
    question = [ChatMessage(role="user", content="Name a fruit.")]
    turn_one = GenerationJob(prompt_tokens=tuple(cached.tokenize_chat(question)), max_tokens=32, sampling=GREEDY)
    reply = _run(cached, [turn_one])[0].answer
    conversation = [*question, ChatMessage(role="assistant", content=reply), ChatMessage(role="user", content="Why?")]
    turn_two = GenerationJob(prompt_tokens=tuple(cached.tokenize_chat(conversation)), max_tokens=8, sampling=GREEDY)
    count = PrefillCount(cached)
    assert _run(cached, [turn_two])[0].error is None
    assert count.reused >= len(turn_one.prompt_tokens)
    assert count.prefilled < len(turn_two.prompt_tokens) - len(turn_one.prompt_tokens)


def test_cached_cells_give_way_to_a_job_that_needs_them(cached: GGUFEngine) -> None:
    _run_together(cached, [_job(cached, PROMPTS[0]), _job(cached, PROMPTS[2])])
    assert all(cached._idle.values()), "both idle sequences should hold cached tokens now"
    # This job needs every cell of the window: it must not wait behind idle caches.
    whole = _job(cached, PROMPTS[3])
    whole = _job(cached, PROMPTS[3], max_tokens=cached.metadata.n_ctx - len(whole.prompt_tokens))
    sink = _run(cached, [whole])[0]
    assert sink.error is None and sink.reason is FinishReason.STOP
    assert _cells_add_up(cached)


def test_batch_mates_served_from_the_cache_repeat_exactly(cached: GGUFEngine) -> None:
    # From the second round on, both sequences find their whole prompt cached and decode the same shapes, so the
    # answers must repeat token for token; a stale or misplaced cell would make them drift.
    rounds = [_run_together(cached, [_job(cached, prompt) for prompt in PROMPTS[:2]]) for _ in range(3)]
    for sinks in rounds:
        assert all(sink.error is None and sink.answer.strip() for sink in sinks)
    assert [sink.answer for sink in rounds[1]] == [sink.answer for sink in rounds[2]]
    assert _cells_add_up(cached)


@pytest.fixture(scope="module")
def saving() -> Iterator[GGUFEngine]:
    loaded = GGUFEngine(_settings(prompt_cache=True, parallel=2, n_ctx=1024))
    yield loaded
    loaded.close()


def _push_out(engine: GGUFEngine, prompt: GenerationJob) -> None:
    """Run two other prompts side by side, so both sequence ids are taken and ``prompt``'s cells are cut."""
    _run_together(engine, [_job(engine, PROMPTS[1]), _job(engine, PROMPTS[2])])
    tokens = prompt.prompt_tokens
    assert all(common_prefix_length(held, tokens) < len(tokens) - 1 for held in engine._idle.values())


def test_a_prompt_whose_cells_were_taken_over_comes_back_from_host_memory(saving: GGUFEngine) -> None:
    job = _job(saving, PROMPTS[0])
    first = _run(saving, [job])[0]
    _push_out(saving, job)
    count, restored = PrefillCount(saving), saving.states_restored
    again = _run(saving, [_job(saving, PROMPTS[0])])[0]
    assert (count.reused, count.prefilled) == (len(job.prompt_tokens) - 1, 1)
    assert saving.states_restored == restored + 1
    # Now the prompt is in the KV cache itself: the same cells, the same last token decoded alone. A restored cell
    # that differed from the saved one in any bit would show up as another answer.
    repeat = _run(saving, [_job(saving, PROMPTS[0])])[0]
    assert again.answer == repeat.answer
    assert _common_prefix(again.answer, first.answer) >= min(AGREED_PREFIX_CHARS, len(first.answer))
    assert _cells_add_up(saving)


def test_a_saved_state_llama_cpp_refuses_leaves_the_job_to_decode_its_prompt(
    saving: GGUFEngine, caplog: pytest.LogCaptureFixture
) -> None:
    job = _job(saving, PROMPTS[3])
    first = _run(saving, [job])[0]
    _push_out(saving, job)
    store = saving._saved
    assert store is not None and store.best_for(job.prompt_tokens)[1] == len(job.prompt_tokens) - 1
    broken, _ = store.best_for(job.prompt_tokens)
    assert broken is not None
    # Same size, nothing but zeros: llama.cpp reads no valid header and refuses it.
    store.drop(broken)
    store.add(SavedState(broken.tokens, (ctypes.c_uint8 * broken.size)(), broken.size))
    count = PrefillCount(saving)
    with caplog.at_level("WARNING", logger="innova_smollm.engine.scheduler"):
        again = _run(saving, [_job(saving, PROMPTS[3])])[0]
    assert again.error is None and again.answer == first.answer
    assert count.prefilled == len(job.prompt_tokens)
    assert "could not restore a saved prompt state" in caplog.text
    assert store.best_for(job.prompt_tokens)[1] < len(job.prompt_tokens) - 1, "the refused state should be dropped"
    assert _cells_add_up(saving)


def test_with_no_memory_for_saved_states_a_pushed_out_prompt_is_decoded_again() -> None:
    loaded = GGUFEngine(_settings(prompt_cache=True, prompt_cache_mb=0, parallel=2, n_ctx=1024))
    try:
        job = _job(loaded, PROMPTS[0])
        _run(loaded, [job])
        _push_out(loaded, job)
        count = PrefillCount(loaded)
        assert _run(loaded, [_job(loaded, PROMPTS[0])])[0].error is None
        assert count.prefilled > 1
        assert (loaded.states_saved, loaded.states_restored) == (0, 0)
    finally:
        loaded.close()


def test_without_the_prompt_cache_every_prompt_is_decoded_whole(engine: GGUFEngine) -> None:
    job = _job(engine, PROMPTS[1], max_tokens=4)
    count = PrefillCount(engine)
    _run(engine, [job, job])
    assert (count.reused, count.prefilled) == (0, 2 * len(job.prompt_tokens))
    assert _cells_add_up(engine) and not any(engine._idle.values())


#: With batched attention products (flash attention off) the alone and batched answers still agree this far.
AGREED_PREFIX_CHARS_BATCHED_ATTENTION = 8


def test_auto_layout_gives_this_small_model_a_stream_per_sequence() -> None:
    loaded = GGUFEngine(_settings(kv_layout=KVLayout.AUTO, parallel=2, n_ctx=512))
    try:
        # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) dims x 2 bytes per cell.
        assert loaded._model.kv_bytes_per_cell() == 30 * 3 * 128 * 2
        assert loaded.metadata.kv_layout == "per_sequence"
        assert loaded._total_cells == 2 * 512
    finally:
        loaded.close()


@pytest.mark.parametrize("layout", list(KVLayout))
def test_flash_attention_is_on_by_default_for_several_sequences(layout: KVLayout) -> None:
    loaded = GGUFEngine(_settings(flash_attn=FlashAttention.AUTO, kv_layout=layout))
    try:
        assert loaded.metadata.flash_attn is True
    finally:
        loaded.close()


def test_with_flash_attention_off_a_batch_answers_like_alone() -> None:
    loaded = GGUFEngine(_settings(flash_attn=FlashAttention.OFF, prompt_cache=False))
    try:
        assert loaded.metadata.flash_attn is False
        alone_answers = [_run(loaded, [_job(loaded, prompt)])[0].answer for prompt in PROMPTS]
        together = _run_together(loaded, [_job(loaded, prompt) for prompt in PROMPTS])
        for sink, alone_answer in zip(together, alone_answers, strict=True):
            assert sink.error is None and sink.reason in (FinishReason.STOP, FinishReason.LENGTH)
            agreed = _common_prefix(sink.answer, alone_answer)
            assert agreed >= min(AGREED_PREFIX_CHARS_BATCHED_ATTENTION, len(alone_answer)), (sink.answer, alone_answer)
    finally:
        loaded.close()


# --- one KV stream per sequence (SMOLLM_KV_LAYOUT=per_sequence) ---------------------------------------------------


@pytest.fixture(scope="module")
def per_sequence() -> Iterator[GGUFEngine]:
    loaded = GGUFEngine(_settings(kv_layout=KVLayout.PER_SEQUENCE, parallel=2, n_ctx=512))
    yield loaded
    loaded.close()


def test_per_sequence_layout_gives_every_sequence_a_whole_window(per_sequence: GGUFEngine) -> None:
    assert per_sequence.metadata.n_ctx == 512
    assert per_sequence._total_cells == 2 * 512


def test_per_sequence_jobs_that_each_need_the_whole_window_run_side_by_side(
    per_sequence: GGUFEngine,
) -> None:
    # In the shared layout the second job would wait for the first (test_a_job_waits_for_kv_cells_then_runs).
    short = "What is 2 plus 2?"
    whole = per_sequence.metadata.n_ctx - len(_job(per_sequence, short).prompt_tokens)
    sinks = _run_together(per_sequence, [_job(per_sequence, short, max_tokens=whole) for _ in range(2)])
    assert all(sink.error is None and sink.reason is FinishReason.STOP for sink in sinks)
    assert sinks[1].started_at < sinks[0].finished_at
    # Same prompt, same positions, each in a stream of its own: the two rows of every batch compute alike.
    assert sinks[0].answer == sinks[1].answer
    assert _cells_add_up(per_sequence)


def test_per_sequence_refuses_a_job_larger_than_its_window(per_sequence: GGUFEngine) -> None:
    # The whole cache holds two windows, but one job may use only its own.
    job = _job(per_sequence, PROMPTS[0], max_tokens=per_sequence.metadata.n_ctx)
    assert isinstance(_run(per_sequence, [job])[0].error, ContextLengthExceededError)


def test_per_sequence_prompt_cache_reuses_the_prompt(per_sequence: GGUFEngine) -> None:
    _run(per_sequence, [_job(per_sequence, PROMPTS[2], max_tokens=8)])
    count = PrefillCount(per_sequence)
    again = _job(per_sequence, PROMPTS[2], max_tokens=8)
    assert _run(per_sequence, [again])[0].error is None
    assert (count.reused, count.prefilled) == (len(again.prompt_tokens) - 1, 1)


def test_per_sequence_restores_a_pushed_out_prompt_from_host_memory(per_sequence: GGUFEngine) -> None:
    job = _job(per_sequence, PROMPTS[3], max_tokens=8)
    _run(per_sequence, [job])
    _push_out(per_sequence, job)
    count, restored = PrefillCount(per_sequence), per_sequence.states_restored
    again = _run(per_sequence, [_job(per_sequence, PROMPTS[3], max_tokens=8)])[0]
    repeat = _run(per_sequence, [_job(per_sequence, PROMPTS[3], max_tokens=8)])[0]
    assert (count.reused, count.prefilled) == (2 * (len(job.prompt_tokens) - 1), 2)
    assert per_sequence.states_restored == restored + 1
    assert again.answer == repeat.answer
    assert _cells_add_up(per_sequence)


def test_per_sequence_batch_answers_like_alone() -> None:
    loaded = GGUFEngine(_settings(kv_layout=KVLayout.PER_SEQUENCE, prompt_cache=False))
    try:
        alone_answers = [_run(loaded, [_job(loaded, prompt)])[0].answer for prompt in PROMPTS]
        together = _run_together(loaded, [_job(loaded, prompt) for prompt in PROMPTS])
        for sink, alone_answer in zip(together, alone_answers, strict=True):
            assert sink.error is None
            assert _common_prefix(sink.answer, alone_answer) >= min(AGREED_PREFIX_CHARS, len(alone_answer))
    finally:
        loaded.close()


def test_per_sequence_batches_list_the_sequences_in_increasing_id_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # llama.cpp decodes separate KV streams in one ubatch only while each id is the previous one plus one.
    loaded = GGUFEngine(_settings(kv_layout=KVLayout.PER_SEQUENCE, parallel=3, n_ctx=256, prompt_cache=False))
    try:
        # One job alone takes id 0 and makes it the most recently used: the next three are admitted as 1, 2, 0.
        _run(loaded, [_job(loaded, PROMPTS[0], max_tokens=2)])
        assert list(loaded._idle) == [1, 2, 0]
        batches: list[list[int]] = []
        real_decode = llama_cpp.llama_decode

        def recording_decode(ctx: object, batch: object) -> int:
            rows = [batch.seq_id[index][0] for index in range(batch.n_tokens)]  # type: ignore[attr-defined]
            batches.append(rows)
            return int(real_decode(ctx, batch))

        monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
        sinks = _run_together(loaded, [_job(loaded, prompt, max_tokens=8) for prompt in PROMPTS[1:]])
        assert all(sink.error is None for sink in sinks)
        decode_steps = [rows for rows in batches if len(set(rows)) == len(rows) == 3]
        assert decode_steps, batches
        assert all(rows == [0, 1, 2] for rows in decode_steps), decode_steps
    finally:
        loaded.close()


# --- n choices of one prompt ------------------------------------------------------------------------------------


class ChoicesSink(RecordingSink):
    """Collects the choices of a job with ``n`` > 1 apart; done once every choice has finished (or the job failed)."""

    def __init__(self, n: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.n = n
        self.texts: dict[int, list[str]] = {index: [] for index in range(n)}
        self.reasons: dict[int, FinishReason] = {}
        self.tokens: dict[int, int] = {}

    def text(self, chunk: str, logprobs: object = None, choice: int = 0) -> None:
        with self._lock:
            self.texts[choice].append(chunk)

    def finished(self, reason: FinishReason, completion_tokens: int, logprobs: object = None, choice: int = 0) -> None:
        with self._lock:
            self.reasons[choice], self.tokens[choice] = reason, completion_tokens
            if len(self.reasons) == self.n:
                self._done.set()

    @property
    def answers(self) -> list[str]:
        with self._lock:
            return ["".join(self.texts[index]) for index in range(self.n)]


def _choices(engine: GGUFEngine, job: GenerationJob) -> ChoicesSink:
    sink = ChoicesSink(job.n)
    engine.submit(job, sink)
    sink.wait()
    assert sink.error is None, sink.error
    return sink


@pytest.mark.parametrize("layout", ["shared", "per_sequence"])
def test_greedy_choices_decode_the_prompt_once_and_answer_like_one(
    layout: str, engine: GGUFEngine, per_sequence: GGUFEngine, alone: list[RecordingSink]
) -> None:
    loaded = engine if layout == "shared" else per_sequence
    n = loaded.metadata.parallel
    job = _job(loaded, PROMPTS[0], n=n)
    count = PrefillCount(loaded)
    sink = _choices(loaded, job)
    # Decoded once, whatever n is: the other choices got the prompt's cells by copy.
    assert count.reused + count.prefilled == len(job.prompt_tokens)
    # The copied cells hold the same keys and values: greedy choices are the same answer...
    assert len(set(sink.answers)) == 1 and sink.answers[0]
    assert len(set(sink.reasons.values())) == 1 and len(set(sink.tokens.values())) == 1
    # ... and agree with the answer of the prompt alone (n sequences decode per step instead of one: see the module
    # docstring for why a prefix).
    reference = alone[0].answer if layout == "shared" else _run(loaded, [_job(loaded, PROMPTS[0])])[0].answer
    assert _common_prefix(sink.answers[0], reference) >= min(AGREED_PREFIX_CHARS, len(reference))
    assert _cells_add_up(loaded)


@pytest.mark.parametrize("layout", ["shared", "per_sequence"])
def test_sampled_choices_differ_and_a_seed_repeats_them(
    layout: str, engine: GGUFEngine, per_sequence: GGUFEngine
) -> None:
    loaded = engine if layout == "shared" else per_sequence
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    job = _job(loaded, PROMPTS[1], n=2, sampling=sampling, max_tokens=24)
    first = _choices(loaded, job)
    again = _choices(loaded, _job(loaded, PROMPTS[1], n=2, sampling=sampling, max_tokens=24))
    assert first.answers == again.answers
    assert first.answers[0] != first.answers[1]


def test_choices_keep_their_own_stop_strings_and_max_tokens(engine: GGUFEngine) -> None:
    sink = _choices(engine, _job(engine, PROMPTS[0], n=2, max_tokens=5))
    assert sink.reasons == {0: FinishReason.LENGTH, 1: FinishReason.LENGTH} and sink.tokens == {0: 5, 1: 5}
    answer = sink.answers[0]
    stop = answer[len(answer) // 2 :].strip()[:3] or answer
    stopped = _choices(engine, _job(engine, PROMPTS[0], n=2, max_tokens=5, stop=(stop,)))
    assert all(stop not in text for text in stopped.answers)
    assert set(stopped.reasons.values()) == {FinishReason.STOP}
    assert _cells_add_up(engine)


#: Greedy, with the embedded model's end tokens forbidden: an answer that runs until max_tokens or cancelled.
NEVER_ENDS = SamplingParams(temperature=0.0, logit_bias=((0, -100.0), (2, -100.0)))


def _cancelled_once_running(engine: GGUFEngine, job: GenerationJob) -> ChoicesSink:
    sink = ChoicesSink(job.n)
    engine.submit(job, sink)
    assert wait_until(lambda: all(sink.texts.values()), timeout=WAIT_S)
    sink.cancel()
    sink.wait()
    return sink


def test_cancelling_a_job_ends_all_its_choices(engine: GGUFEngine) -> None:
    sink = _cancelled_once_running(engine, _job(engine, PROMPTS[2], n=3, max_tokens=400, sampling=NEVER_ENDS))
    assert sink.reasons == dict.fromkeys(range(3), FinishReason.CANCELLED)
    assert _cells_add_up(engine)


def test_more_choices_than_sequences_is_refused(per_sequence: GGUFEngine) -> None:
    sink = ChoicesSink(3)
    per_sequence.submit(_job(per_sequence, PROMPTS[0], n=3), sink)
    sink.wait()
    assert isinstance(sink.error, GenerationError) and "3 choices" in str(sink.error)


def test_the_last_choice_to_end_keeps_the_prompt_in_the_cache(cached: GGUFEngine) -> None:
    job = _job(cached, PROMPTS[2], n=2, max_tokens=8)
    _choices(cached, job)
    assert _cells_add_up(cached)
    count = PrefillCount(cached)
    assert _run(cached, [_job(cached, PROMPTS[2], max_tokens=8)])[0].error is None
    assert (count.reused, count.prefilled) == (len(job.prompt_tokens) - 1, 1)
    assert _cells_add_up(cached)


def test_in_the_shared_cache_choices_reserve_the_prompt_once(engine: GGUFEngine) -> None:
    # Four choices run only if their answers and the prompt's cells, counted once, fit the one shared cache, and
    # one more token each would not fit: the engine refuses what it could never hold.
    prompt = _job(engine, PROMPTS[0]).prompt_tokens
    fits = (engine._total_cells - len(prompt)) // 4
    sink = _cancelled_once_running(engine, _job(engine, PROMPTS[0], n=4, max_tokens=fits, sampling=NEVER_ENDS))
    assert sink.reasons == dict.fromkeys(range(4), FinishReason.CANCELLED)
    too_many = ChoicesSink(4)
    engine.submit(_job(engine, PROMPTS[0], n=4, max_tokens=fits + 1), too_many)
    too_many.wait()
    assert isinstance(too_many.error, ContextLengthExceededError)
    assert _cells_add_up(engine)
