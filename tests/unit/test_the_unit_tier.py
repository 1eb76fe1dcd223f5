"""The unit tier needs neither a model nor llama_cpp: proven by running it where llama_cpp cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parent

#: Runs pytest on the unit tier with ``import llama_cpp`` made to fail, leaving out this test itself.
WITHOUT_LLAMA_CPP = """
import sys
sys.modules["llama_cpp"] = None  # any import of it now raises ImportError
import pytest
sys.exit(pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "-k", "not needs_no_llama_cpp"]))
"""


def test_the_unit_tier_needs_no_llama_cpp() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_LLAMA_CPP, str(UNIT)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=UNIT.parents[1],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
