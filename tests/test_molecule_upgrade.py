"""The two-host Molecule scenario of the rolling model upgrade (tests/molecule/upgrade), as CI and operators run it.

SmolLM2 on two systemd containers -> upgrade to Gemma-3-270M one host after the other -> two failing upgrades
to a file that is not a loadable GGUF (first host rolled back, second never touched) -> rollback on demand.
Select with ``-m molecule``; the full log is kept in build/molecule-upgrade.log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "build"

pytestmark = [
    pytest.mark.molecule,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="podman containers with systemd need Linux"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the scripts install packages and run privileged podman as root"),
]


def _run(name: str, argv: list[str], timeout_s: int) -> None:
    LOGS.mkdir(exist_ok=True)
    log = LOGS / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-150:])
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}; full log in {log}\n{tail}", pytrace=False)


@pytest.mark.timeout(2400)
def test_molecule_upgrade_scenario() -> None:
    """Rolling upgrade, automatic rollback on a broken model, rollback on demand, across two hosts."""
    _run("fetch-gemma3", [sys.executable, "scripts/fetch_model.py", "smollm2", "gemma3"], timeout_s=900)
    _run("molecule-upgrade", ["bash", "scripts/molecule.sh", "test", "upgrade"], timeout_s=2300)
