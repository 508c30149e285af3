"""The named fault points the kill tests use (workers.runtime.faults): a real SIGKILL at the nth hit,
and at most one kill per marker file (a replacement actor inherits the environment)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from workers.runtime import faults

HITS = "from workers.runtime import faults\nfor _ in range(3): faults.point('p')\nprint('alive')"


def _hit_three_times(env: dict[str, str]) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", HITS], env=env, cwd=root, capture_output=True, text=True)


def test_a_point_kills_at_its_nth_hit_and_only_the_first_process_with_a_marker(tmp_path):
    assert _hit_three_times({}).stdout.strip() == "alive"  # unset: nothing happens
    assert _hit_three_times({"CALIBRAY_FAULT": "other:1"}).stdout.strip() == "alive"
    assert _hit_three_times({"CALIBRAY_FAULT": "p:2"}).returncode == -signal.SIGKILL
    assert _hit_three_times({"CALIBRAY_FAULT": "p:4"}).stdout.strip() == "alive"  # never reached
    once = {"CALIBRAY_FAULT": "p:1", "CALIBRAY_FAULT_ONCE": str(tmp_path / "fired")}
    assert _hit_three_times(once).returncode == -signal.SIGKILL
    assert (tmp_path / "fired").exists()
    assert _hit_three_times(once).stdout.strip() == "alive"  # the marker exists: a second process lives


@pytest.mark.parametrize("spec", ["", ":2", "p:0", "p:x"])
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match="CALIBRAY_FAULT"):
        faults.parse(spec)
