"""The helper tests use for external processes shows their stderr when they fail (issue 17 item 6)."""

from __future__ import annotations

import sys

import pytest

from tests import procs

FAIL = [sys.executable, "-c", "import sys; print('to stdout'); sys.exit('the reason it failed')"]


def test_a_failed_command_shows_its_stderr_and_exit_code():
    with pytest.raises(AssertionError) as e:
        procs.run(FAIL)
    assert "the reason it failed" in str(e.value) and "exit code 1" in str(e.value) and "to stdout" in str(e.value)
    assert procs.run(FAIL, check=False).returncode == 1  # check=False leaves the assertion to the caller


def test_a_background_process_prints_its_log_when_the_block_ends(tmp_path, capsys):
    with procs.background(FAIL, tmp_path / "p.log") as p:
        p.wait(timeout=60)
    out = capsys.readouterr().out
    assert "the reason it failed" in out and "exit code 1" in out
