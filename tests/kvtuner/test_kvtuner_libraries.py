"""benchmarks.kvtuner_libraries: the greedy-agreement measure and the up-front refusal of a bad work dir."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.kvtuner_libraries import agreement


def test_agreement_counts_matches_and_the_prefix_before_the_first_mismatch():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    out = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [9, 2, 3, 4]])
    a = agreement(out, ref)
    assert a["identical"] == pytest.approx(1 / 3)
    assert a["prefix"] == pytest.approx((4 + 1 + 0) / 3)  # a row that never diverges counts all its tokens
    assert a["match"] == pytest.approx(10 / 12)  # positions after a divergence still count here


def test_a_work_dir_without_a_finished_run_is_refused_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.kvtuner_libraries", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(tmp_path) in r.stderr.strip().splitlines()[-1]
