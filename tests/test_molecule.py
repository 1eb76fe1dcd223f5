"""Provisioning tests: ansible-lint (production profile) and the Molecule scenarios in podman containers.

Both run the project scripts that CI and operators use (scripts/lint-ansible.sh, scripts/molecule.sh), so the
pytest run and a manual run test the same thing. Select them with ``-m molecule``; the full log of each run is
kept in build/ for the failure report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "build"

pytestmark = pytest.mark.molecule


@pytest.fixture(autouse=True)
def _root_on_linux() -> None:
    # A missing prerequisite fails loudly: a skipped scenario would read as a pass that proves nothing.
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.fail("the Molecule scenarios need Linux and root (apt-get, privileged podman with systemd)")


def _run(name: str, argv: list[str], timeout_s: int) -> None:
    LOGS.mkdir(exist_ok=True)
    log = LOGS / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-150:])
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}; full log in {log}\n{tail}", pytrace=False)


@pytest.mark.timeout(600)
def test_ansible_lint_production_profile() -> None:
    _run("ansible-lint", ["bash", "scripts/lint-ansible.sh"], timeout_s=540)


@pytest.mark.timeout(2400)
def test_molecule_default_scenario() -> None:
    """Converge site.yml on a fresh systemd container, idempotence, verify (health, chat, sandbox, failures)."""
    _run("molecule-default", ["bash", "scripts/molecule.sh", "test", "default"], timeout_s=2300)
