"""Provisioning tests: ansible-lint (production profile) and the Molecule scenarios in podman containers.

They run the project scripts that CI and operators use (scripts/lint-ansible.sh, scripts/molecule.sh), so the
pytest run and a manual run test the same thing. Select them with ``-m molecule``; the full log of each run is
kept in build/ for the failure report. Scenarios (tests/molecule/):
- default: converge site.yml on a fresh systemd container, idempotence, verify (health, chat, sandbox, failures);
- upgrade: two hosts, SmolLM2 -> Gemma-3-270M one after the other, a broken model rolled back on the first host
  with the second untouched, rollback on demand;
- faults: kill -9 and SIGTERM during a stream, the model removed or truncated, the disk filling up during a
  download; verify prints one summary line per drill (quoted in docs/operations.md);
- fleet: HAProxy (role innova_lb) in front of three backends with SMOLLM_PARALLEL=2: slot-aware balancing, kill -9 and
  SIGSTOP of a backend under load, a drain drill and a rolling model upgrade, drained host by host, with 0 failed
  requests; each drill's summary is printed (for docs/fleet.md).
- production_shape: the production-shaped 3B model copied from the controller, the production inventory's settings,
  the role's computed MemoryMax; four concurrent requests, then no OOM kill, no restart, no swap, resident memory
  under MemoryMax and /metrics memory equal to /proc (the summary is quoted in docs/performance.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / "build"

pytestmark = pytest.mark.molecule


@pytest.fixture(autouse=True)
def _root_on_linux() -> None:
    # A missing prerequisite fails loudly: a skipped scenario would read as a pass that proves nothing.
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.fail("the Molecule scenarios need Linux and root (apt-get, privileged podman with systemd)")


def _run(name: str, argv: list[str], timeout_s: int) -> str:
    """Run a project script with its output in build/<name>.log; its output, or a failure with the log's tail."""
    LOGS.mkdir(exist_ok=True)
    log = LOGS / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-150:])
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}; full log in {log}\n{tail}", pytrace=False)
    return text


@pytest.mark.timeout(600)
def test_ansible_lint_production_profile() -> None:
    _run("ansible-lint", ["bash", "scripts/lint-ansible.sh"], timeout_s=540)


@pytest.mark.timeout(2400)
def test_molecule_default_scenario() -> None:
    """Converge site.yml on a fresh systemd container, idempotence, verify (health, chat, sandbox, failures)."""
    _run("molecule-default", ["bash", "scripts/molecule.sh", "test", "default"], timeout_s=2300)


@pytest.mark.timeout(2400)
def test_molecule_upgrade_scenario() -> None:
    """Rolling upgrade, automatic rollback on a broken model, rollback on demand, across two hosts."""
    _run("fetch-gemma3", [sys.executable, "scripts/fetch_model.py", "smollm2", "gemma3"], timeout_s=900)
    _run("molecule-upgrade", ["bash", "scripts/molecule.sh", "test", "upgrade"], timeout_s=2300)


@pytest.mark.timeout(2400)
def test_molecule_faults_scenario() -> None:
    """kill -9, SIGTERM drain, missing/truncated model and disk-full download drills on innovaplus-backend.service."""
    text = _run("molecule-faults", ["bash", "scripts/molecule.sh", "test", "faults"], timeout_s=2300)
    drills = ("kill -9 of PID", "systemctl stop after", "model file", "disk full")
    for line in text.splitlines():
        if '"msg":' in line and any(drill in line for drill in drills):
            print(line.strip())  # the drill summaries, for the README table


@pytest.mark.timeout(1800)
def test_molecule_fleet_scenario() -> None:
    """Balancer + 3 backends: slot-aware, kill -9, SIGSTOP, drained rolling upgrade with 0 failed requests."""
    _run("fetch-gemma3", [sys.executable, "scripts/fetch_model.py", "smollm2", "gemma3"], timeout_s=900)
    text = _run("molecule-fleet", ["bash", "scripts/molecule.sh", "test", "fleet"], timeout_s=1700)
    drills = ("slot-aware:", "drain:", "kill -9 of", "SIGSTOP of", "load during the rolling upgrade")
    summaries = [line.strip() for line in text.splitlines() if '"msg":' in line and any(d in line for d in drills)]
    for line in summaries:
        print(line)  # the drill summaries, for docs/fleet.md
    # verify.yml asserts each drill; this only checks that all five ran (and printed their summaries).
    for drill in drills:
        assert any(drill in line for line in summaries), f"no summary of {drill!r} in build/molecule-fleet.log"


@pytest.mark.timeout(1800)
def test_molecule_production_shape_scenario() -> None:
    """The 3B-shaped model under the role's computed MemoryMax: 4 requests, no OOM, no swap, /metrics = /proc."""
    sys.path.insert(0, str(REPO / "scripts"))
    import production_shape  # scripts/ is not a package

    if production_shape.cached_model(verify_sha256=False) is None:
        pytest.fail(
            f"the production-shaped model is not cached in {production_shape.default_cache_dir()}: build it once with "
            "`.venv/bin/python scripts/fetch_model.py llama32-3b-shape` (about 17 minutes on 2 cores)",
            pytrace=False,
        )
    text = _run(
        "molecule-production-shape", ["bash", "scripts/molecule.sh", "test", "production_shape"], timeout_s=1700
    )
    summaries = [line.strip() for line in text.splitlines() if '"msg":' in line and "production shape:" in line]
    assert summaries, "no summary line in build/molecule-production-shape.log"
    for line in summaries:
        print(line)  # for docs/performance.md
