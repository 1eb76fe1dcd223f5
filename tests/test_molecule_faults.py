"""Fault drills on the real systemd unit, in a Molecule container (tests/molecule/faults).

``kill -9`` and SIGTERM during a streamed generation, the model file removed or truncated under the running
service, and the disk filling up during a model download; verify prints one summary line per drill (quoted in
the README). Runs ``scripts/molecule.sh test faults``, as an operator would; select it with ``-m molecule``.
The full log is kept in build/molecule-faults.log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "build" / "molecule-faults.log"

pytestmark = [
    pytest.mark.molecule,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="podman containers with systemd need Linux"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the scripts install packages and run privileged podman as root"),
    pytest.mark.skipif(
        shutil.which("apt-get") is None and shutil.which("podman") is None, reason="needs apt or podman"
    ),
]


@pytest.mark.timeout(2400)
def test_molecule_faults_scenario() -> None:
    """kill -9, SIGTERM drain, missing/truncated model and disk-full download drills on innovaplus-backend.service."""
    LOG.parent.mkdir(exist_ok=True)
    argv = ["bash", "scripts/molecule.sh", "test", "faults"]
    with LOG.open("w") as out:
        proc = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=2300, check=False)
    text = LOG.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-150:])
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}; full log in {LOG}\n{tail}", pytrace=False)
    # The drill summaries, for the README table.
    for line in text.splitlines():
        if '"msg":' in line and any(
            k in line for k in ("kill -9 of PID", "systemctl stop after", "model file", "disk full")
        ):
            print(line.strip())
