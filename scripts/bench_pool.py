#!/usr/bin/env python3
"""The rounds of several ``bench.py`` runs put together: (b)'s paired ratios against each peer, over all of them.

Why: on the noisy 2-core box one run's one-client ratios spread from 0.77 to 1.23 and its median moves by several
per cent from run to run, so a gap of 3 % needs a hundred rounds or so, more than one run can take. Every run keeps
its rounds in ``bench-<stamp>.json``; the rounds of runs made with the same code can be pooled. Each ratio comes
with a bootstrap 95 % interval of its median and the share of rounds in which (b) was ahead. Pool only runs that
measured the same code and settings: nothing here can check that.

    .venv/bin/python scripts/bench_pool.py bench-results/bench-20261130-1*.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/ is not a package

BOOTSTRAP_RESAMPLES = 5000


def pooled_ratios(runs: list[list[bench.PeerFigures]]) -> dict[str, tuple[list[float], int]]:
    """Each ratio row of ``bench.ratio_rows``, its rounds from every run that has it, and how many runs those are."""
    pooled: dict[str, tuple[list[float], int]] = {}
    for peers in runs:
        figures = {peer.key: peer for peer in peers if peer.available}
        levels = sorted({c for peer in peers for c in peer.levels})
        for label, values in bench.ratio_rows(figures, levels):
            if values:
                rounds, count = pooled.get(label, ([], 0))
                pooled[label] = (rounds + values, count + 1)
    return pooled


def median_interval(values: list[float], *, seed: int = 0) -> tuple[float, float]:
    """A bootstrap 95 % interval of the median (percentile method; seeded, so a report can be reproduced)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_RESAMPLES))
    return medians[int(0.025 * BOOTSTRAP_RESAMPLES)], medians[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]


def pooled_table(pooled: dict[str, tuple[list[float], int]]) -> str:
    rows = [
        "| ratio | median | 95 % interval of the median | (b) ahead | rounds | runs |",
        "|---|---|---|---|---|---|",
    ]
    for label, (values, runs) in pooled.items():
        low, high = median_interval(values)
        ahead = sum(value > 1 for value in values) / len(values)
        rows.append(
            f"| {label} | {statistics.median(values):.3f} | {low:.3f} to {high:.3f} | {ahead:.0%} | {len(values)} "
            f"| {runs} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench-<stamp>.json files written by scripts/bench.py")
    args = parser.parse_args()
    missing = [str(path) for path in args.runs if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    pooled = pooled_ratios([bench.load_samples(path) for path in args.runs])
    if not pooled:
        parser.error("these runs have no peer measured side by side with (b)")
    print(f"(b)'s ratios, rounds pooled over {len(args.runs)} run(s):\n")
    print(pooled_table(pooled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
