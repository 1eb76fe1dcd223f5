"""The process's memory as Linux reports it, and whether the model's weights can sit in huge pages.

Why huge pages matter here: decoding one token reads every weight once (about 1.9 GB for the production 3B model),
and with 4 KiB pages those reads cross a page every 4 KiB, so the TLB misses and the hardware prefetchers, which stop
at page boundaries, cost a large share of the step. llama.cpp allocates its weight, repacked-weight and KV buffers
with plain ``posix_memalign``, which gets transparent huge pages only when the kernel's mode is ``always`` (Debian
12's stock kernel), or when the mode is ``madvise`` (Ubuntu's kernels, many cloud and VM kernels) and glibc is told
to advise its large mappings: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, a documented glibc (2.35+) tunable read at
process start. The role's unit sets it, as do ``scripts/dev serve`` and the benchmark's start of this service
(docs/performance.md, "Huge pages", has the measurement); the engine logs what the process got, and ``/metrics``
exports it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path

#: The glibc tunable that makes malloc advise huge pages for its large mappings (``madvise(MADV_HUGEPAGE)``).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"

PROC_STATUS = Path("/proc/self/status")
PROC_SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

#: Fields exported as smollm_process_memory_bytes{kind=...}. RssAnon and VmSwap show leaks that hide from RSS (heap
#: growth pushed to swap, file-backed pages of a mapped model coming and going); AnonHugePages (from smaps_rollup)
#: shows whether the weights got huge pages.
_STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmSwap": "swap"}
_SMAPS_FIELDS = {"AnonHugePages": "anon_huge_pages"}


def read_memory(status: Path = PROC_STATUS, smaps_rollup: Path = PROC_SMAPS_ROLLUP) -> dict[str, float]:
    """Bytes by kind (rss, rss_anon, rss_file, swap, anon_huge_pages); a kind is missing where /proc lacks it."""
    return {**_read_fields(status, _STATUS_FIELDS), **_read_fields(smaps_rollup, _SMAPS_FIELDS)}


def _read_fields(path: Path, fields: Mapping[str, str]) -> dict[str, float]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    memory: dict[str, float] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        kind = fields.get(name)
        if kind is not None:
            amount, _, unit = rest.strip().partition(" ")
            memory[kind] = float(amount) * (1024 if unit.strip().lower() == "kb" else 1)
    return memory


def transparent_huge_pages_mode(path: Path = THP_MODE) -> str:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``, the bracketed word), or ``unavailable``."""
    try:
        text = path.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def huge_pages_advice(mode: str, environ: Mapping[str, str] | None = None) -> str | None:
    """What to change so the weights get huge pages, or None when nothing is to change (or nothing can be)."""
    if mode != "madvise":
        return None  # always: they get them; never / unavailable: only the host's administrator can change that
    tunables = (environ if environ is not None else os.environ).get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE in tunables.split(":"):
        return None
    return (
        f"transparent huge pages are in 'madvise' mode and GLIBC_TUNABLES does not hold {HUGE_PAGES_TUNABLE}: "
        "the model's weights sit in 4 KiB pages, which decodes about a quarter slower on the production model; "
        f"start the service with GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} (the role's unit does; docs/performance.md)"
    )


def release_free_heap() -> int | None:
    """Hand the C heap's free pages back to the kernel once start-up is over; returns the bytes RSS fell by, or None
    where the C library has no ``malloc_trim`` (glibc has it; musl does not).

    Why: loading frees a lot inside malloc's heaps (llama.cpp's GGUF metadata and read buffers, the Python list of
    token strings llguidance's tokenizer is built from) between allocations that stay (llama.cpp's vocabulary,
    that tokenizer). glibc returns only the free top of a heap by itself; ``malloc_trim(0)``, a documented glibc call
    (malloc_trim(3)), also releases the whole free pages in the middle. On the production model that is about 10 MiB
    that requests did not take back (docs/results/2026-12-06-production-memory/README.md, "Evening").
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return None
    before = _read_fields(PROC_STATUS, _STATUS_FIELDS).get("rss", 0.0)  # VmRSS alone: no walk of smaps_rollup
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return max(int(before - _read_fields(PROC_STATUS, _STATUS_FIELDS).get("rss", 0.0)), 0)
