"""What the engine holds for each admitted job: its sequence's state, and the group of a job's ``n`` choices.

Plain state with no llama.cpp in it; :mod:`innova_smollm.engine.scheduler` creates, steps and ends them.
"""

from __future__ import annotations

from typing import Any

from innova_smollm.core.types import GenerationJob, TokenLogprob, TokenSink
from innova_smollm.engine.detokenize import LogprobQueue, TextAssembler


class ChoiceGroup:
    """The choices of one job with ``n`` > 1 (see :mod:`innova_smollm.engine.scheduler`'s docstring)."""

    __slots__ = ("awaiting_prompt", "members", "prompt_cells")

    def __init__(self, prompt_cells: int) -> None:
        self.members: list[RunningSequence] = []
        #: Choices whose prompt cells are not copied yet (all but the first, until its prefill is complete).
        self.awaiting_prompt: list[RunningSequence] = []
        #: The prompt's cells, reserved once for the whole group and freed with its last choice.
        self.prompt_cells = prompt_cells


class RunningSequence:
    """One admitted job, or one choice of a job with ``n`` > 1: its KV sequence id, its sampler chain and where it
    stands."""

    __slots__ = (
        "assembler",
        "batch_index",
        "choice",
        "fed",
        "group",
        "job",
        "last_token",
        "logprobs",
        "matcher",
        "pending",
        "position",
        "prefilled",
        "produced",
        "queue",
        "reserved_cells",
        "sampler",
        "seq_id",
        "sink",
    )

    def __init__(
        self,
        job: GenerationJob,
        sink: TokenSink,
        seq_id: int,
        sampler: Any | None,
        matcher: Any | None = None,
        *,
        choice: int = 0,
        group: ChoiceGroup | None = None,
    ) -> None:
        self.job = job
        self.sink = sink
        self.seq_id = seq_id
        self.sampler = sampler
        self.choice = choice
        self.group = group
        #: llguidance's matcher when the answer is constrained (see sampling.Candidates and _deliver_constrained).
        self.matcher = matcher
        #: Answer tokens already delivered that go into the KV cache before ``last_token`` at the next step: the
        #: sampled token and the forced ones before the last (jump-forward, see _deliver_constrained).
        self.pending: list[int] = []
        #: Each answer token's log probability, when the job asked for them, and which of them each text chunk carries.
        self.logprobs: list[TokenLogprob] | None = [] if job.logprobs is not None else None
        self.queue: LogprobQueue[TokenLogprob] | None = LogprobQueue() if job.logprobs is not None else None
        self.assembler = TextAssembler(job.stop)
        #: Cells held for this sequence; a group's prompt cells are the group's (``ChoiceGroup.prompt_cells``).
        self.reserved_cells = job.max_tokens if group is not None else len(job.prompt_tokens) + job.max_tokens
        #: How many prompt tokens are already in the KV cache; generation starts once all are.
        self.prefilled = 0
        #: Position of the next token this sequence puts in the KV cache.
        self.position = 0
        self.produced = 0
        #: Generated tokens put into the KV cache so far (all but the last sampled one); kept for the prompt cache.
        self.fed: list[int] = []
        self.last_token = -1
        #: Row of this sequence's logits in the current batch, or -1 when it has no output this step.
        self.batch_index = -1

    @property
    def generating(self) -> bool:
        return self.prefilled == len(self.job.prompt_tokens)
