"""Continuous batching: up to ``parallel`` requests decode together in one llama.cpp batch per step.

One engine thread owns one llama context. Each step it builds a single multi-sequence ``llama_batch``: the last
sampled token of every sequence that is generating, plus a chunk of the prompt of sequences still being prefilled.
After one ``llama_decode`` each sequence samples its next token in C from its own sampler chain, reading its own row
of logits by batch index, so no logits ever reach Python. A new job joins between steps; a finished or cancelled
sequence leaves by removing its cells from the shared KV cache (``llama_memory_seq_rm``), which frees room at once.

A job with ``n`` choices takes ``n`` sequence ids at once (it waits at the head of the line until they are free).
Only the first choice prefills the prompt; the step that completes it copies the prompt's cells to the others
(``llama_memory_seq_cp``) and every choice samples its first token from that same row of logits, with a sampler
of its own. In the shared layout the copy only tags the same cells with more sequence ids, so the prompt's cells are
reserved once per job; with one KV stream per sequence llama.cpp copies the stream's buffer at the next decode, and
until then no sequence state is saved or restored (they would read or be overwritten by the pending copy).

The KV cache's layout, which sequence a job takes and the prompt cache's policy are in
:mod:`innova_smollm.engine.kv_cache`; sampling is in :mod:`innova_smollm.engine.sampling`. ``SMOLLM_PARALLEL=1`` is
this same engine with one sequence.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from innova_smollm.core.types import (
    ChatMessage,
    FinishReason,
    GenerationJob,
    JobFinish,
    ModelMetadata,
    PromptCacheStats,
    TokenLogprob,
    TokenSink,
)
from innova_smollm.engine.grammar import MAX_FORCED_PER_STEP, Constraints
from innova_smollm.engine.kv_cache import MIN_SAVED_STATE_GAIN, choose_sequence, resolve_kv_layout
from innova_smollm.engine.model import GGUFModel
from innova_smollm.engine.sampling import Candidates, LogitRows, grammar_error, new_sampler
from innova_smollm.engine.saved_states import SavedState, SavedStates, common_prefix_length
from innova_smollm.engine.sequences import ChoiceGroup, RunningSequence
from innova_smollm.engine.step_size import LARGE_MODEL_PARAMETERS, step_tokens
from innova_smollm.engine.threads import ThreadCounts, ThreadGovernor, batch_threads, new_thread_governor
from innova_smollm.errors import (
    ContextLengthExceededError,
    GenerationError,
    ModelLoadError,
    NotReadyError,
    RequestTimeoutError,
)
from innova_smollm.settings import KVLayout, Settings, WarmKind, WarmPrompt

log = logging.getLogger(__name__)

#: With one KV stream per sequence, llama.cpp copies only whole streams: a running sequence's prefix is copied only
#: when it is at least this fraction (1/64) of the window. Copying a stream costs about as much as decoding a few
#: tokens of a small model (SmolLM2 at 4096 tokens: 94 MB); of a 3B model, much less than one token.
WHOLE_STREAM_COPY_MIN_SHARE = 64

#: While other sequences are generating, a new prompt is prefilled at most this many tokens per step, so a long
#: prompt delays the running streams by one short chunk per step instead of by its whole prefill.
PREFILL_CHUNK_WHILE_DECODING = 128


class GGUFEngine:
    """A loaded GGUF model decoding up to ``settings.parallel`` requests together (continuous batching)."""

    def __init__(self, settings: Settings) -> None:
        path = settings.model_path
        started = time.perf_counter()
        self._model = GGUFModel(path, settings)
        self._llama = self._model.llama
        self._vocab = self._model.vocab
        self._parallel = settings.parallel
        parameters = int(llama_cpp.llama_model_n_params(self._llama.model))
        self._n_batch = step_tokens(parameters, settings.n_ctx)
        self._kv_layout = resolve_kv_layout(
            settings.kv_layout,
            parallel=self._parallel,
            window_bytes=settings.n_ctx * self._model.kv_bytes_per_cell(),
        )
        self._per_sequence = self._kv_layout is KVLayout.PER_SEQUENCE
        self._flash_attn = settings.flash_attention_for(self._model.n_gpu_layers, several_sequences=self._parallel > 1)
        self._ctx = self._new_context(settings, path)
        #: The window of one request: the whole cache when shared, its own stream when per sequence.
        self._n_ctx = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._total_cells = int(llama_cpp.llama_n_ctx(self._ctx))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._metadata = self._model.describe(
            settings,
            n_ctx=self._n_ctx,
            parallel=self._parallel,
            flash_attn=self._flash_attn,
            load_time_s=time.perf_counter() - started,
            kv_layout=self._kv_layout,
            step_tokens=self._n_batch,
        )
        self._timeout_s = settings.request_timeout_s
        self._threads = new_thread_governor(settings)

        # Batch arrays are reached through cached pointers: each attribute read of a ctypes field builds a new object.
        self._batch_token = self._batch.token
        self._batch_pos = self._batch.pos
        self._batch_n_seq_id = self._batch.n_seq_id
        self._batch_logits = self._batch.logits
        self._batch_seq_id = [self._batch.seq_id[i] for i in range(self._n_batch)]
        for i in range(self._n_batch):
            self._batch_n_seq_id[i] = 1
        self.pieces = self._model.pieces
        self._n_vocab = int(self._model.llama.n_vocab())
        self._greedy = LogitRows(self._ctx, self._n_vocab)
        self._candidates = Candidates(self._ctx, self._n_vocab, self._greedy)
        self._constraints = Constraints(self._vocab, token_slices=parameters < LARGE_MODEL_PARAMETERS)
        #: Forced tokens a sequence may append in one step, so that every sequence's share fits in one batch.
        self._max_forced = max(0, min(MAX_FORCED_PER_STEP, self._n_batch // self._parallel - 1))

        self._inbox: queue.SimpleQueue[tuple[GenerationJob, TokenSink] | None] = queue.SimpleQueue()
        self._waiting: deque[tuple[GenerationJob, TokenSink]] = deque()
        self._running: dict[int, RunningSequence] = {}  # by seq id, in admission order
        #: Sequence ids not running, least recently used first, each with the tokens its KV cells still hold.
        self._idle: dict[int, list[int]] = {seq_id: [] for seq_id in range(self._parallel)}
        self._prompt_cache = settings.prompt_cache
        saves_states = settings.prompt_cache and settings.prompt_cache_mb > 0
        self._saved = SavedStates(settings.prompt_cache_mb * 2**20) if saves_states else None
        #: Cells neither reserved by a running job nor held by an idle sequence's cached tokens. Per sequence, the
        #: count spans all streams, so it never holds a job back: a free sequence id always has a whole window.
        self._free_cells = self._total_cells
        #: Prompt tokens taken from the cache and prompt tokens decoded, since start (diagnostics, /metrics).
        self.prompt_tokens_reused = 0
        self.prompt_tokens_prefilled = 0
        #: Sequence states copied to host memory and copied back (diagnostics).
        self.states_saved = 0
        self.states_restored = 0
        #: Prompt prefixes taken from a running sequence's cells (diagnostics).
        self.prefixes_copied = 0
        #: A copy across KV streams (per sequence) was asked for and happens at the next llama_decode.
        self._copies_pending = False
        #: How the latest job ended, even when nobody was listening any more (diagnostics and tests).
        self.last_finish: JobFinish | None = None
        self._stopping = False
        self._closed = False
        if settings.warm_prompts:
            try:
                self._warm(settings.warm_prompts)
            except BaseException:
                self._free_llama()
                raise
        self._worker = threading.Thread(target=self._serve, name="llama-batched-engine", daemon=True)
        self._worker.start()

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def threads(self) -> ThreadGovernor:
        return self._threads

    def prompt_cache(self) -> PromptCacheStats | None:
        # Read from another thread without a lock: each figure is one int, and a scrape may be a step behind.
        return PromptCacheStats(
            tokens_reused=self.prompt_tokens_reused,
            tokens_decoded=self.prompt_tokens_prefilled,
            states_saved=self.states_saved,
            states_restored=self.states_restored,
            saved_bytes=self._saved.bytes_used if self._saved is not None else 0,
        )

    # --- tokens ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    @property
    def chat_template(self) -> str:
        return self._model.chat_template

    def tokenize_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        return self._model.tokenize_chat(messages, tools)

    def tokenize_text(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self._model.tokenize_text(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self._n_vocab:
            raise ValueError(f"token {token} is outside the vocabulary (0 to {self._n_vocab - 1})")
        return self._model.token_bytes(token)

    # --- constraints ----------------------------------------------------------------------------------------

    def grammar_error(self, grammar: str) -> str | None:
        # Parsing reads the vocabulary only, which no thread writes: safe beside the engine thread's decoding.
        return grammar_error(self._vocab, grammar)

    def gbnf_grammar(self, grammar: str) -> str:
        return self._constraints.gbnf(grammar)

    def json_schema_grammar(self, schema: Mapping[str, Any] | None) -> str:
        return self._constraints.json_schema(schema)

    # --- jobs -----------------------------------------------------------------------------------------------

    def submit(self, job: GenerationJob, sink: TokenSink) -> None:
        if self._closed:
            sink.failed(NotReadyError("stopping", "the engine is shut down"))
            return
        self._inbox.put((job, sink))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        self._worker.join(timeout=30)
        if self._worker.is_alive():
            # Freeing the context under a thread still inside llama_decode would crash the process; leak instead.
            log.error("the engine thread did not stop within 30 s; leaving its llama context allocated")
            return
        self._free_llama()

    def _free_llama(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None
        self._model.close()

    # --- the engine thread ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                self._take_new_jobs(block=not self._running and not self._waiting)
                if self._stopping:
                    break
                self._drop_abandoned_waiting()
                # Before admitting: a sequence whose caller left gives its cells back as an idle sequence, so the
                # caller's next turn, often the very job waiting here, finds its prefix there.
                self._end_cancelled_and_late()
                self._admit()
                if self._running:
                    self._step()
        except Exception as exc:  # the loop itself broke: nothing can run any more, so say so to everyone
            log.exception("the engine loop failed")
            self._closed = True
            self._fail_everyone(GenerationError(f"llama.cpp engine failed: {exc}"))
        self._fail_everyone(NotReadyError("stopping", "the engine shut down before this request ended"))

    def _take_new_jobs(self, *, block: bool) -> None:
        if not block and self._inbox.empty():
            return  # the usual case between two steps, and cheaper than raising and catching queue.Empty
        with contextlib.suppress(queue.Empty):
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._stopping = True
                    return
                self._waiting.append(item)
                item = self._inbox.get_nowait()

    def _drop_abandoned_waiting(self) -> None:
        """Release waiting jobs whose caller left or whose deadline passed, without waiting for a free slot."""
        if not self._waiting:
            return
        now = time.monotonic()
        kept: deque[tuple[GenerationJob, TokenSink]] = deque()
        for job, sink in self._waiting:
            if sink.cancelled():
                continue  # a caller that left is owed nothing
            if now > job.deadline:
                self._notify_failed(sink, RequestTimeoutError(self._timeout_s))
                continue
            kept.append((job, sink))
        self._waiting = kept

    def _admit(self) -> None:
        """Start waiting jobs, first come first served, while a sequence id and enough KV cells are free."""
        while self._waiting and self._idle:
            job, sink = self._waiting[0]
            prompt = job.prompt_tokens
            needed = len(prompt) + job.max_tokens
            error = self._cannot_run(job)
            if error is not None:
                self._waiting.popleft()
                self._notify_failed(sink, error)
                continue
            if job.n > len(self._idle):
                return  # the head waits for n sequence ids; later jobs wait behind it, so it is never starved
            seq_id, reusable = choose_sequence(self._idle, self._running, prompt, per_sequence=self._per_sequence)
            others = self._other_choices_sequences(seq_id, job.n - 1)
            # The prompt's cells once, and each choice's answer: the other choices share the prompt's cells.
            needed += (job.n - 1) * job.max_tokens
            if needed > self._free_cells + self._idle_cells(seq_id, others):
                self._drop_idle_caches(keep=seq_id, until_free=needed - len(self._idle[seq_id]))
                if needed > self._free_cells + self._idle_cells(seq_id, others):
                    return  # the head waits for cells; later jobs wait behind it so a long job is never starved
            self._waiting.popleft()
            cached = self._idle.pop(seq_id)
            reused = self._reuse_prefix(seq_id, cached, prompt, reusable=reusable)
            # The sequence's cached cells become part of this job's reservation.
            self._free_cells += len(cached) - needed
            group = ChoiceGroup(len(prompt)) if job.n > 1 else None
            running = self._start(job, sink, seq_id, choice=0, group=group)
            running.prefilled = running.position = reused
            self.prompt_tokens_reused += reused
            self.prompt_tokens_prefilled += len(prompt) - reused
            for choice, other in enumerate(others, start=1):
                self._empty_idle_sequence(other)
                assert group is not None
                group.awaiting_prompt.append(self._start(job, sink, other, choice=choice, group=group))
            members = group.members if group is not None else [running]
            broken = next((m.matcher for m in members if m.matcher is not None and m.matcher.is_error()), None)
            if broken is not None:  # checked when prepared: cannot happen, but say so
                self._abort(running, GenerationError(f"the request's grammar failed: {broken.get_error()}"))
                continue
            try:
                sink.started()
            except Exception as exc:
                self._abort(running, exc)

    def _cannot_run(self, job: GenerationJob) -> Exception | None:
        """Why ``job`` could never run here, or None. The service checks all of it before submitting; this guards the
        KV cache against any other caller."""
        prompt = len(job.prompt_tokens)
        if not prompt or prompt + job.max_tokens > self._n_ctx:
            return ContextLengthExceededError(prompt_tokens=prompt, max_tokens=job.max_tokens, n_ctx=self._n_ctx)
        if not 1 <= job.n <= self._parallel:
            return GenerationError(f"a job asked for {job.n} choices; this engine runs {self._parallel} sequences")
        if prompt + job.n * job.max_tokens > self._total_cells:
            return ContextLengthExceededError(
                prompt_tokens=prompt, max_tokens=job.n * job.max_tokens, n_ctx=self._total_cells
            )
        return None

    def _start(
        self, job: GenerationJob, sink: TokenSink, seq_id: int, *, choice: int, group: ChoiceGroup | None
    ) -> RunningSequence:
        """A running sequence for one choice of ``job``, on the sequence id ``seq_id`` just taken from the idle ones."""
        sampling = job.sampling
        if choice and sampling.seed is not None:
            # Each choice draws on its own: a seeded job's choice i uses seed + i, so the set of answers repeats.
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + choice) % 2**32)
        matcher = self._constraints.matcher(job.grammar) if job.grammar is not None else None
        running = RunningSequence(
            job, sink, seq_id, new_sampler(sampling, self._n_vocab), matcher, choice=choice, group=group
        )
        if group is not None:
            group.members.append(running)
        self._running[seq_id] = running
        return running

    def _other_choices_sequences(self, first: int, count: int) -> list[int]:
        """Idle sequence ids for a job's choices after the first (on ``first``): empty ones first, then the least
        recently used, and per sequence the ids that keep the running ones in the fewest runs (see choose_sequence)."""
        chosen: list[int] = []
        for _ in range(count):
            candidates = {
                seq_id: cached for seq_id, cached in self._idle.items() if seq_id != first and seq_id not in chosen
            }
            seq_id, _reuse = choose_sequence(
                candidates, [*self._running, first, *chosen], (), per_sequence=self._per_sequence
            )
            chosen.append(seq_id)
        return chosen

    def _idle_cells(self, first: int, others: Iterable[int]) -> int:
        return len(self._idle[first]) + sum(len(self._idle[seq_id]) for seq_id in others)

    def _empty_idle_sequence(self, seq_id: int) -> None:
        """Take the idle sequence ``seq_id`` for a choice that gets the prompt by copy: its cached cells go (saved to
        host memory first, when worth it) and count as free again."""
        cached = self._idle.pop(seq_id)
        if cached:
            self._save_state(seq_id, cached, keep=0)
            self._free_cells += len(cached)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def _trim(self, seq_id: int, *, keep: int) -> int:
        """Keep the first ``keep`` cached cells of an idle sequence, free the rest; returns how many were kept."""
        memory = self._memory
        # A sliding-window cache may already have dropped the oldest positions of this sequence: then the prefix
        # is no longer whole, and a recurrent cache cannot be cut in the middle. Both start again from nothing.
        whole = keep > 0 and llama_cpp.llama_memory_seq_pos_min(memory, seq_id) == 0
        if whole and llama_cpp.llama_memory_seq_rm(memory, seq_id, keep, -1):
            return keep
        llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
        return 0

    def _reuse_prefix(self, seq_id: int, cached: list[int], prompt: Sequence[int], *, reusable: int) -> int:
        """Leave in the sequence ``seq_id``, just taken from the idle ones with ``cached`` tokens, the longest prefix
        of ``prompt`` on offer: its own first ``reusable`` cells, a running sequence's or a saved state's; returns
        the prefix's length."""
        usable = self._saved is not None and not self._copies_pending
        saved, saved_reuse = self._saved.best_for(prompt) if self._saved is not None and usable else (None, 0)
        source, shared = self._running_prefix(prompt) if self._prompt_cache else (None, 0)
        worth = shared >= max(reusable, saved_reuse) + MIN_SAVED_STATE_GAIN
        if self._per_sequence:  # a whole stream is copied: for a few tokens, decoding them is cheaper
            worth = worth and shared * WHOLE_STREAM_COPY_MIN_SHARE >= self._n_ctx
        if source is not None and worth:
            self._save_state(seq_id, cached, keep=0)
            if cached:
                self._trim(seq_id, keep=0)
            return self._copy_prefix(source, seq_id, shared)
        # The restored state occupies all its cells until it is trimmed: they must be free, not promised.
        if saved is not None and (
            saved_reuse < reusable + MIN_SAVED_STATE_GAIN or len(saved.tokens) > self._free_cells + len(cached)
        ):
            saved = None
        keep = 0 if saved is not None else reusable
        self._save_state(seq_id, cached, keep=keep)
        reused = self._trim(seq_id, keep=keep) if cached else 0
        if saved is not None:
            reused = self._restore_state(seq_id, saved, keep=saved_reuse)
        return reused

    def _running_prefix(self, prompt: Sequence[int]) -> tuple[RunningSequence | None, int]:
        """The running sequence whose cells hold the longest prefix of ``prompt``, and that prefix's length.

        Two cases make this worth it: requests that share a start (a system prompt) while one of them is still
        running, and the next turn of a chat whose previous answer is still finishing (a client that read enough
        of it and asked again at once): both would otherwise decode the whole shared prefix again.
        """
        best: RunningSequence | None = None
        best_length = 0
        limit = len(prompt) - 1
        for running in self._running.values():
            held = running.job.prompt_tokens[: running.prefilled]
            length = common_prefix_length(held, prompt, limit)
            if length == len(held) and running.generating and length < limit:
                length += common_prefix_length(running.fed, prompt[length:], limit - length)
            if length > best_length:
                best, best_length = running, length
        return best, best_length

    def _copy_prefix(self, source: RunningSequence, seq_id: int, length: int) -> int:
        """Give the empty sequence ``seq_id`` the first ``length`` cells of a running sequence; returns ``length``.

        In the shared cache the cells become the two sequences' own (no copy, no new cells: llama.cpp marks them
        with both ids). One stream per sequence: llama.cpp copies only whole streams (at its next decode, before
        the batch), and the copy is then cut to ``length``, still far cheaper than decoding the prefix.
        """
        memory = self._memory
        if self._per_sequence:
            llama_cpp.llama_memory_seq_cp(memory, source.seq_id, seq_id, -1, -1)
            llama_cpp.llama_memory_seq_rm(memory, seq_id, length, -1)
            self._copies_pending = True
        else:
            llama_cpp.llama_memory_seq_cp(memory, source.seq_id, seq_id, 0, length)
        self.prefixes_copied += 1
        return length

    def _save_state(self, seq_id: int, tokens: list[int], *, keep: int) -> None:
        """Copy an idle sequence's KV state to host memory before all but its first ``keep`` cells are cut."""
        saved = self._saved
        if saved is None or len(tokens) - keep < MIN_SAVED_STATE_GAIN or saved.covers(tokens):
            return
        if self._copies_pending:
            return  # a stream's copy is still to come: its buffer may not hold what its cells say yet
        # A sliding-window cache may have dropped the first positions: such a state could not stand for a prefix.
        if llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id) != 0:
            return
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq_id))
        if size <= 0 or size > saved.limit_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, seq_id) != size:
            return
        if saved.add(SavedState(tuple(tokens), data, size)):
            self.states_saved += 1

    def _restore_state(self, seq_id: int, state: SavedState, *, keep: int) -> int:
        """Copy a saved state into the empty sequence ``seq_id`` and keep its first ``keep`` cells; returns how many
        cells it kept (0 when llama.cpp refused the state: the job then decodes its whole prompt)."""
        assert self._saved is not None
        if not llama_cpp.llama_state_seq_set_data(self._ctx, state.data, state.size, seq_id):
            # llama.cpp found no run of free cells long enough (the shared cache can be fragmented) or rejected
            # the data; it left the sequence empty. The state is dropped so the next job does not try it again.
            log.warning("could not restore a saved prompt state of %d tokens; decoding the prompt", len(state.tokens))
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._saved.drop(state)
            return 0
        self._saved.used(state)
        self.states_restored += 1
        return self._trim(seq_id, keep=keep)

    def _drop_idle_caches(self, *, keep: int, until_free: int) -> None:
        """Free idle sequences' cached cells, least recently used first, until ``until_free`` cells are free."""
        for seq_id, cached in self._idle.items():
            if self._free_cells >= until_free:
                return
            if seq_id == keep or not cached:
                continue
            self._save_state(seq_id, cached, keep=0)
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._free_cells += len(cached)
            self._idle[seq_id] = []

    def _end_cancelled_and_late(self) -> None:
        now = time.monotonic()
        for running in list(self._running.values()):
            if running.sink.cancelled():
                self._finish(running, FinishReason.CANCELLED)
            elif now > running.job.deadline:
                self._finish(running, FinishReason.TIMEOUT)

    def _step(self) -> None:
        """Decode one batch, and sample one token for every sequence that has logits."""

        n_tokens = 0
        tokens, positions, logits, seq_ids = self._batch_token, self._batch_pos, self._batch_logits, self._batch_seq_id
        in_batch: list[RunningSequence] = []
        prefilling: list[RunningSequence] = []
        running_now: Iterable[RunningSequence] = self._running.values()
        if self._per_sequence:
            # In increasing id order: with one KV stream per sequence, llama.cpp puts sequences in one ubatch only
            # while each id is the previous one plus one, so an unordered batch splits into several (measured: 4-token
            # steps 9-39 % slower than the shared cache's instead of faster). The shared cache splits by count: there
            # rows stay in order of admission.
            running_now = sorted(running_now, key=_by_seq_id)
        for running in running_now:
            if not running.generating:
                running.batch_index = -1
                if running.group is None or running.choice == 0:  # the other choices get the prompt by copy
                    prefilling.append(running)
                continue
            if running.pending:
                n_tokens = self._put_pending(running, n_tokens)
            tokens[n_tokens] = running.last_token
            running.fed.append(running.last_token)
            positions[n_tokens] = running.position
            seq_ids[n_tokens][0] = running.seq_id
            logits[n_tokens] = 1
            running.batch_index = n_tokens
            running.position += 1
            in_batch.append(running)
            n_tokens += 1
        decode_tokens = n_tokens
        budget = self._n_batch - n_tokens
        if n_tokens:
            budget = min(budget, PREFILL_CHUNK_WHILE_DECODING)
        for running in prefilling:
            running.batch_index = -1
            prompt = running.job.prompt_tokens
            take = min(budget, len(prompt) - running.prefilled)
            if take <= 0:
                continue
            seq_id = running.seq_id
            start = running.prefilled
            for offset in range(take):
                tokens[n_tokens] = prompt[start + offset]
                positions[n_tokens] = start + offset
                seq_ids[n_tokens][0] = seq_id
                logits[n_tokens] = 0
                n_tokens += 1
            budget -= take
            running.prefilled += take
            running.position = running.prefilled
            in_batch.append(running)
            if running.generating:
                logits[n_tokens - 1] = 1
                running.batch_index = n_tokens - 1

        self._batch.n_tokens = n_tokens
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        self._copies_pending = False
        if n_tokens == decode_tokens and status == 0:
            # Only pure decode steps are compared: a prompt chunk makes a step longer for reasons of its own.
            change = self._threads.step_done(n_tokens, time.perf_counter() - started)
            if change is not None:
                set_threads(self._ctx, change)
        if status != 0:
            # Reservations make "no KV slot" (1) impossible; anything else is llama.cpp failing. The sequences in
            # this batch cannot continue, the others were not touched.
            error = GenerationError(f"llama_decode failed with status {status}")
            log.error("llama_decode failed with status %d for %d sequences", status, len(in_batch))
            for running in in_batch:
                self._abort(running, error)
            return
        for running in list(in_batch):
            if running.group is not None and running.group.awaiting_prompt and running.batch_index >= 0:
                in_batch.extend(self._share_prompt(running, running.group))

        # Sample every sequence first, then hand the tokens out in one go: the deliveries then reach the event loop
        # as one burst (one wake-up, see sinks.LoopInbox) instead of one wake-up per sequence between samplings.
        sampled = [
            (
                running,
                self._candidates.sample(running.batch_index, running.sampler, running.matcher)
                if running.matcher is not None
                else self._greedy.highest(running.batch_index)
                if running.sampler is None
                else llama_cpp.llama_sampler_sample(running.sampler, self._ctx, running.batch_index),
            )
            for running in in_batch
            if running.batch_index >= 0
        ]
        for running, token in sampled:
            try:
                if running.matcher is None:
                    self._deliver(running, token)
                else:
                    self._deliver_constrained(running, running.matcher, token)
            except Exception as exc:  # a broken sink ends its own job only
                self._abort(running, exc)

    def _share_prompt(self, first: RunningSequence, group: ChoiceGroup) -> list[RunningSequence]:
        """The first choice's prompt is now in the KV cache: copy its cells to the other choices, which sample their
        first token from the same row of logits. Answers the choices that got the prompt."""
        shared = []
        for running in group.awaiting_prompt:
            if running.seq_id not in self._running:
                continue  # it ended (cancelled) before its prompt came
            # The whole sequence (p0, p1 = -1): across KV streams llama.cpp copies only whole streams.
            llama_cpp.llama_memory_seq_cp(self._memory, first.seq_id, running.seq_id, -1, -1)
            running.prefilled = running.position = first.prefilled
            running.batch_index = first.batch_index
            shared.append(running)
        group.awaiting_prompt = []
        if self._per_sequence and shared:
            self._copies_pending = True
        return shared

    def _put_pending(self, running: RunningSequence, n_tokens: int) -> int:
        """Put the sequence's pending answer tokens in the batch, without logits; returns the batch's new size."""
        tokens, positions, logits, seq_ids = self._batch_token, self._batch_pos, self._batch_logits, self._batch_seq_id
        for token in running.pending:
            tokens[n_tokens] = token
            positions[n_tokens] = running.position
            seq_ids[n_tokens][0] = running.seq_id
            logits[n_tokens] = 0
            running.position += 1
            n_tokens += 1
        running.fed.extend(running.pending)
        running.pending = []
        return n_tokens

    def _deliver_constrained(self, running: RunningSequence, matcher: Any, token: int) -> None:
        """Deliver a sampled token of a constrained answer, then the tokens its grammar forces next (jump-forward).

        Forced tokens (llguidance's fast-forward tokens: the rest of a key, punctuation, an enum value's tail) are
        delivered at once and go into the KV cache together at the next step, before the last of them, whose
        logits give the next sampled token: n forced tokens cost one batched decode instead of n. llguidance
        returns only tokens the model's tokenizer would produce for those bytes whatever follows, so the cache
        holds the tokenization the model knows. An answer whose grammar allows nothing more ends here, without
        the decode step that would only sample its end token. Forced tokens have no logits of their own, so a job
        that asked for log probabilities samples every token.
        """
        if token < 0 or not matcher.consume_token(token):
            raise GenerationError(f"the answer's grammar allows no next token ({matcher.get_error() or 'none fits'})")
        if not self._deliver(running, token):
            return
        forced: list[int] = []
        if running.logprobs is None and self._max_forced:
            forced = matcher.compute_ff_tokens()[: self._max_forced]
            if forced and not matcher.consume_tokens(forced):
                raise GenerationError(f"the answer's grammar refused its own forced tokens: {matcher.get_error()}")
            if running.sampler is not None:
                for forced_token in forced:  # the chain's penalties count every answer token
                    llama_cpp.llama_sampler_accept(running.sampler, forced_token)
        for forced_token in forced:
            if not self._deliver(running, forced_token):
                return
        if matcher.is_stopped():
            self._finish(running, FinishReason.STOP)
            return
        if forced:
            running.pending = [token, *forced[:-1]]

    def _deliver(self, running: RunningSequence, token: int) -> bool:
        """Hand a token's text to the sink; True while the job goes on (False: it finished here)."""
        piece, ends_generation = self.pieces(token)
        if ends_generation:
            self._finish(running, FinishReason.STOP)
            return False
        running.produced += 1
        fed = running.assembler.feed(piece)
        queue = running.queue
        if running.logprobs is not None and queue is not None:
            entry = self._logprob(running, token)
            running.logprobs.append(entry)
            queue.add(entry, fed)
        if fed.text:
            running.sink.text(fed.text, None if queue is None else queue.sent(len(fed.text)), running.choice)
        if fed.stopped:
            self._finish(running, FinishReason.STOP)
            return False
        if running.produced >= running.job.max_tokens:
            self._finish(running, FinishReason.LENGTH)
            return False
        running.last_token = token
        return True

    def _logprob(self, running: RunningSequence, token: int) -> TokenLogprob:
        """The token's log probability under the model's raw distribution (this step's logits, before temperature,
        penalties, biases and grammar), with the ``job.logprobs`` most likely tokens."""
        row = self._greedy.row(running.batch_index)
        highest = float(row.max())
        log_total = highest + float(np.log(np.exp(row - highest, dtype=np.float64).sum()))
        top: tuple[tuple[bytes, float], ...] = ()
        wanted = running.job.logprobs or 0
        if wanted:
            best = np.argpartition(row, -wanted)[-wanted:]
            best = best[np.argsort(-row[best], kind="stable")]
            top = tuple((self.pieces(int(t))[0], float(row[t]) - log_total) for t in best)
        return TokenLogprob(token=self.pieces(token)[0], logprob=float(row[token]) - log_total, top=top)

    # --- leaving --------------------------------------------------------------------------------------------

    def _finish(self, running: RunningSequence, reason: FinishReason) -> None:
        self._release(running)
        self.last_finish = JobFinish(running.job.job_id, reason, running.produced)
        try:
            tail = running.assembler.flush()
            queue = running.queue
            if tail:
                running.sink.text(tail, None if queue is None else queue.sent(len(tail)), running.choice)
            running.sink.finished(reason, running.produced, running.logprobs, running.choice)
        except Exception:
            log.exception("a token sink failed while finishing job %d", running.job.job_id)

    def _abort(self, running: RunningSequence, error: Exception) -> None:
        """End a job that failed: all of its choices, and its sink hears of it once."""
        # After a failure the cells' content is not known: never offer them as a cached prefix.
        members = running.group.members if running.group is not None else [running]
        released = [self._release(member, keep_cache=False) for member in members]
        if not any(released):
            return  # already ended (another choice of the same job failed first)
        if not isinstance(error, GenerationError | NotReadyError):
            log.error("job %d failed: %r", running.job.job_id, error)
            error = GenerationError(f"generation failed: {error}")
        self._notify_failed(running.sink, error)

    def _release(self, running: RunningSequence, *, keep_cache: bool = True) -> bool:
        """Free a sequence that ended; False when it had already left."""
        if self._running.get(running.seq_id) is not running:
            return False
        del self._running[running.seq_id]
        if running.sampler is not None:
            llama_cpp.llama_sampler_free(running.sampler)
        seq_id = running.seq_id
        held: list[int] = []
        freed = running.reserved_cells
        group = running.group
        if group is not None:
            if any(self._running.get(member.seq_id) is member for member in group.members):
                # Other choices still run: only the last to leave keeps the (shared) prompt in the cache.
                keep_cache = False
            else:
                freed += group.prompt_cells
        if keep_cache and self._prompt_cache:
            # Exactly the tokens whose cells this sequence wrote: the prompt so far and the answer tokens fed back.
            held = [*running.job.prompt_tokens[: running.prefilled], *running.fed]
        else:
            # Removing a whole sequence never fails; its cells are free for the next step.
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        self._idle[seq_id] = held  # inserted last: the most recently used
        self._free_cells += freed - len(held)
        return True

    def _fail_everyone(self, error: Exception) -> None:
        for running in list(self._running.values()):
            self._abort(running, error)
        self._take_new_jobs(block=False)
        for _job, sink in self._waiting:
            self._notify_failed(sink, NotReadyError("stopping", "the engine shut down before this request ran"))
        self._waiting.clear()
        # Jobs submitted while closing land after the stop marker: they are owed an answer too.
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._inbox.get_nowait()
                if item is not None:
                    self._notify_failed(item[1], NotReadyError("stopping", "the engine shut down"))

    @staticmethod
    def _notify_failed(sink: TokenSink, error: Exception) -> None:
        try:
            sink.failed(error)
        except Exception:
            log.exception("a token sink failed while being told of an error")

    # --- setup ----------------------------------------------------------------------------------------------

    def _warm(self, prompts: Sequence[WarmPrompt]) -> None:
        """Decode each warm prompt's tokens once, before the engine serves, and pin their KV states in the saved
        states: a request that starts with one then gets its cells back (_reuse_prefix) and decodes what follows.

        Pinned states rather than idle sequences' cells: there are only ``parallel`` sequence ids, and the first
        requests would cut their cells. Runs on the constructing thread, so health says ``loading`` meanwhile.
        """
        assert self._saved is not None  # Settings.check_warm_prompts: warm prompts need the prompt cache
        started = time.perf_counter()
        warmed = 0
        for index, prompt in enumerate(prompts):
            tokens = self._warm_tokens(prompt)
            where = f"SMOLLM_WARM_PROMPTS entry {index} ({prompt.kind.value})"
            if len(tokens) >= self._n_ctx:
                raise ModelLoadError(f"{where} is {len(tokens)} tokens, more than the window of {self._n_ctx}")
            state = self._decode_and_save(tokens)
            if state is None:
                raise ModelLoadError(f"{where}: llama.cpp could not decode or save its {len(tokens)} tokens")
            if not self._saved.pin(state):
                raise ModelLoadError(
                    f"{where}: its KV state ({state.size / 2**20:.1f} MiB) does not fit in SMOLLM_PROMPT_CACHE_MB "
                    f"beside the warm prompts before it ({self._saved.bytes_used / 2**20:.1f} MiB): raise "
                    "SMOLLM_PROMPT_CACHE_MB or shorten the prompts"
                )
            warmed += len(tokens)
        log.info(
            "warmed %d prompts (%d tokens) in %.1f s",
            len(prompts),
            warmed,
            time.perf_counter() - started,
            extra={"event": "prompts_warmed", "prompts": len(prompts), "tokens": warmed},
        )

    def _warm_tokens(self, prompt: WarmPrompt) -> list[int]:
        if prompt.kind is WarmKind.TEXT:
            return self._model.tokenize(prompt.text)
        # What every conversation with this system prompt starts with, whatever its first user turn: the tokens
        # two renderings with different user turns share.
        system = ChatMessage(role="system", content=prompt.text)
        first = self._model.tokenize_chat([system, ChatMessage(role="user", content="Hello.")])
        second = self._model.tokenize_chat([system, ChatMessage(role="user", content="What?")])
        return first[: common_prefix_length(first, second)]

    def _decode_and_save(self, tokens: Sequence[int]) -> SavedState | None:
        """Decode ``tokens`` into sequence 0 (no logits), copy its KV state to host memory and empty it again."""
        seq_id = 0
        try:
            for start in range(0, len(tokens), self._n_batch):
                chunk = tokens[start : start + self._n_batch]
                for offset, token in enumerate(chunk):
                    self._batch_token[offset] = token
                    self._batch_pos[offset] = start + offset
                    self._batch_seq_id[offset][0] = seq_id
                    self._batch_logits[offset] = 0
                self._batch.n_tokens = len(chunk)
                if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
                    return None
            size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq_id))
            data = (ctypes.c_uint8 * size)()
            if size <= 0 or llama_cpp.llama_state_seq_get_data(self._ctx, data, size, seq_id) != size:
                return None
            return SavedState(tuple(tokens), data, size)
        finally:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def _new_context(self, settings: Settings, path: Path) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx * self._parallel if self._per_sequence else settings.n_ctx
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_seq_max = self._parallel
        # Each sequence asks for at most one row of logits per step; sizing the output buffer for that instead of
        # for n_batch rows saves n_batch x n_vocab floats (about 100 MB for a 49k vocabulary).
        params.n_outputs_max = self._parallel
        params.n_threads = settings.n_threads
        params.n_threads_batch = batch_threads(settings)
        params.kv_unified = not self._per_sequence
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self._flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._llama.model, params)
        if not ctx:
            self._model.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path} with n_ctx={settings.n_ctx} and "
                f"{self._parallel} parallel sequences, KV layout {self._kv_layout.value} (out of memory?)"
            )
        return ctx


def _by_seq_id(running: RunningSequence) -> int:
    return running.seq_id


def set_threads(ctx: Any, counts: ThreadCounts) -> None:
    """Takes effect at the context's next llama_decode; only the thread that decodes may call it."""
    llama_cpp.llama_set_n_threads(ctx, counts.decode, counts.batch)
