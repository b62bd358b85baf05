"""
The in-process bench scripts still run against the code: they build the real classes by hand, so a change to a
constructor breaks them without breaking the service.
"""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("extra", [[], ["--single"]], ids=["replicated", "single"])
def test_write_path_measures_a_round_of_writes_all_answered(extra):
    """
    If ``bench/write_path.py`` runs one small round, then it exits cleanly (it fails itself when a write goes
    unanswered) and prints the coordinator's µs a write.
    """
    done = subprocess.run([sys.executable, os.path.join(BENCH, "write_path.py"), "--rounds", "1", "--writes", "300"]
                          + extra, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "round 1: coordinator" in done.stdout and "µs a write" in done.stdout
