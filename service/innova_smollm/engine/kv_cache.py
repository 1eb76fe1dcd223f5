"""KV cache policy, as pure functions: which layout, which sequence a new job takes, and what counts as worth saving.

The engine (:mod:`innova_smollm.engine.scheduler`) holds the cells; this module decides, and needs no llama.cpp.

KV cache sizing: ``SMOLLM_KV_LAYOUT=auto``, the default, takes ``per_sequence`` (below) when its extra memory is at
most ``PER_SEQUENCE_EXTRA_KV_BYTES`` and ``shared`` otherwise (``resolve_kv_layout``). ``shared`` makes the cache
*unified*: one pool of ``n_ctx`` cells shared by all sequences, and a job is admitted only when its prompt plus
max_tokens fit in the cells not yet reserved by the running sequences. Why this and not ``n_ctx * parallel``
cells, when memory is dear: it stays what one sequence needs (for a 3B model one 4k-token cache is about
450 MB; four would be 1.8 GB, mostly idle), every request still gets the full ``n_ctx`` window (llama-server instead
divides ``n_ctx`` by its slot count, llama.cpp#11681), and short requests, the common case, run side by side. A
long job waits (first come, first served) until enough cells are free, so it can never run out of room midway.

``SMOLLM_KV_LAYOUT=per_sequence`` trades memory for speed: one stream of ``n_ctx`` cells per sequence
(``kv_unified`` off, ``n_ctx * parallel`` cells in all, what llama-server's slots do with an ``n_ctx`` divided
among them). A sequence's attention then spans only its own cells instead of every cell in use, which decodes
several sequences faster (docs/performance.md), and a job never waits for cells, only for a free sequence id.
llama.cpp decodes several streams in one ubatch only when their sequence ids are consecutive and in increasing
order, so in this layout each batch lists its sequences by id and a new job prefers an id next to the running ones
(``choose_sequence``); otherwise every step would pass over the weights once per group of ids.

Prompt cache: a sequence that ends keeps its cells (prompt and answer) in the cache, held by its now idle sequence
id. A new job takes the idle id whose tokens share the longest prefix with its prompt, trims the rest and prefills
only what differs: the chat template's system prompt, and in a multi-turn chat the whole earlier conversation, are
not decoded again. Idle cells count against the free cells, and the least recently used are dropped as soon as a
job needs room, so the cache never delays a job. ``SMOLLM_PROMPT_CACHE=false`` turns it off.

There are only ``parallel`` sequence ids, so under load the id a job takes usually holds another conversation. Before
those cells are cut, the sequence's KV state is copied to host memory (engine/saved_states.py, at most
``SMOLLM_PROMPT_CACHE_MB``), and a job whose prompt shares a longer prefix with a saved state than with any idle
sequence gets that state copied back instead of decoding the prefix again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from innova_smollm.engine.saved_states import common_prefix_length
from innova_smollm.settings import KVLayout

#: A saved state is restored only when it spares at least this many prompt tokens more than the best idle sequence,
#: and a sequence's state is saved only when at least this many of its cached tokens are about to be cut. Copying
#: a state costs microseconds per token; decoding a token costs milliseconds, so the bar is low.
MIN_SAVED_STATE_GAIN = 4
#: Most extra KV memory ``SMOLLM_KV_LAYOUT=auto`` spends on one stream per sequence, which decodes several
#: sequences faster than the shared cache (docs/performance.md); for the
#: 135M model at 2048 tokens it costs 135 MiB more, for a 3B model at 4096 tokens 1.3 GiB, past this budget.
PER_SEQUENCE_EXTRA_KV_BYTES = 512 * 2**20


def resolve_kv_layout(requested: KVLayout, *, parallel: int, window_bytes: int) -> KVLayout:
    """The layout ``SMOLLM_KV_LAYOUT`` asks for, with ``auto`` decided by what one stream per sequence costs:
    ``parallel - 1`` more KV caches of ``window_bytes`` each."""
    if requested is not KVLayout.AUTO:
        return requested
    extra = (parallel - 1) * window_bytes
    return KVLayout.PER_SEQUENCE if extra <= PER_SEQUENCE_EXTRA_KV_BYTES else KVLayout.SHARED


def choose_sequence(
    idle: dict[int, list[int]], running: Iterable[int], prompt: Sequence[int], *, per_sequence: bool
) -> tuple[int, int]:
    """The idle sequence id a new job takes, and how many of its cached tokens the job reuses.

    First choice is the id whose cached tokens share the longest prefix with ``prompt``; at least the prompt's last
    token is always decoded again, as its logits choose the first answer token. Among equals an empty sequence is
    taken before a cached one, then the least recently used (``idle`` is ordered that way), to keep useful caches.

    Per sequence (``SMOLLM_KV_LAYOUT=per_sequence``) one thing comes before the prefix: llama.cpp decodes sequences
    of separate KV streams in one ubatch only when their ids are consecutive, and every extra ubatch is one more
    pass over all the weights in every step. So there the id that keeps the running ids in the fewest runs wins,
    which costs a cached prefix only when its id sits apart from the running ones.
    """
    taken = sorted(running)
    best: tuple[int, int, bool] | None = None
    best_seq = best_reuse = -1
    for seq_id, cached in idle.items():
        reuse = common_prefix_length(cached, prompt, len(prompt) - 1)
        ubatches = consecutive_runs(sorted([*taken, seq_id])) if per_sequence else 0
        key = (ubatches, -reuse, bool(cached))
        if best is None or key < best:
            best, best_seq, best_reuse = key, seq_id, reuse
    return best_seq, best_reuse


def consecutive_runs(ids: Sequence[int]) -> int:
    """How many runs of consecutive numbers the sorted ``ids`` fall into (llama.cpp's ubatches per sequence step)."""
    return sum(1 for index, seq_id in enumerate(ids) if index == 0 or seq_id != ids[index - 1] + 1)
