"""The process's memory figures and the huge-pages advice, on /proc and /sys texts written to temporary files; the
start-up heap trim on this process's own C heap."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from innova_smollm.core.process_memory import (
    HUGE_PAGES_TUNABLE,
    huge_pages_advice,
    read_memory,
    release_free_heap,
    transparent_huge_pages_mode,
)

STATUS = """Name:\tinnova-smollm
VmPeak:\t 4000000 kB
VmRSS:\t 2600000 kB
RssAnon:\t 2500000 kB
RssFile:\t   90000 kB
RssShmem:\t   10000 kB
VmSwap:\t       0 kB
Threads:\t12
"""
SMAPS_ROLLUP = """55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:             2600000 kB
Anonymous:       2500000 kB
AnonHugePages:   2400256 kB
Swap:                  0 kB
"""


def test_memory_is_read_in_bytes_from_status_and_smaps_rollup(tmp_path: Path) -> None:
    (tmp_path / "status").write_text(STATUS)
    (tmp_path / "smaps_rollup").write_text(SMAPS_ROLLUP)
    memory = read_memory(tmp_path / "status", tmp_path / "smaps_rollup")
    assert memory == {
        "rss": 2_600_000 * 1024,
        "rss_anon": 2_500_000 * 1024,
        "rss_file": 90_000 * 1024,
        "swap": 0.0,
        "anon_huge_pages": 2_400_256 * 1024,
    }


def test_a_missing_file_leaves_its_kinds_out(tmp_path: Path) -> None:
    (tmp_path / "status").write_text(STATUS)
    assert set(read_memory(tmp_path / "status", tmp_path / "absent")) == {"rss", "rss_anon", "rss_file", "swap"}
    assert read_memory(tmp_path / "absent", tmp_path / "absent") == {}


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbage\n", "unavailable"),
    ],
)
def test_the_kernel_mode_is_the_bracketed_word(tmp_path: Path, text: str, mode: str) -> None:
    (tmp_path / "enabled").write_text(text)
    assert transparent_huge_pages_mode(tmp_path / "enabled") == mode


def test_no_file_means_unavailable(tmp_path: Path) -> None:
    assert transparent_huge_pages_mode(tmp_path / "absent") == "unavailable"


def test_madvise_mode_without_the_tunable_gets_advice_naming_it() -> None:
    advice = huge_pages_advice("madvise", {})
    assert advice is not None
    assert f"GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}" in advice
    other = huge_pages_advice("madvise", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other is not None


@pytest.mark.parametrize(
    ("mode", "environ"),
    [
        ("madvise", {"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}),
        ("madvise", {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}),
        ("always", {}),
        ("never", {}),
        ("unavailable", {}),
    ],
)
def test_no_advice_when_there_is_nothing_the_service_can_change(mode: str, environ: dict[str, str]) -> None:
    assert huge_pages_advice(mode, environ) is None


def test_release_free_heap_returns_the_free_pages_left_between_live_blocks() -> None:
    """100 MiB in 64 KiB blocks (below malloc's mmap threshold: they sit in the heap), 15 of every 16 freed: glibc
    keeps those holes (only a heap's free top goes back by itself) until malloc_trim releases their pages."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024
    blocks = [libc.malloc(block) for _ in range(1600)]
    assert all(blocks)
    for address in blocks:
        ctypes.memset(address, 1, block)  # resident, not just reserved
    kept = blocks[::16]
    for index, address in enumerate(blocks):
        if index % 16:
            libc.free(address)
    try:
        released = release_free_heap()
        assert released is not None
        assert released > 50 * 2**20, f"only {released / 2**20:.1f} MiB of ~94 MiB of holes released"
    finally:
        for address in kept:
            libc.free(address)
