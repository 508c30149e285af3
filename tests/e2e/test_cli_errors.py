"""Bad input on the command line: one line naming the value, exit code 2, no traceback, no run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(args, tmp_path, **env):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, names",
    [
        (["pipelines.kvtuner", "--model", "/no/such/model"], "/no/such/model"),
        (["pipelines.prefixkv", "--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, names, tmp_path):
    p = _cli(args, tmp_path)
    assert p.returncode == 2, procs.output(p)
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(args[0].split(".")[-1] + ": error:") and names in errors[0]
    assert not (tmp_path / "m.db").exists()  # no MLflow store was touched, so no run
    debug = _cli(args, tmp_path, CALIBRAY_DEBUG="1")
    assert "Traceback" in debug.stderr and debug.returncode == 1, procs.output(debug)


def test_corrupt_files_are_named(tmp_path):
    """A config.json that is not JSON and a corpus that is not UTF-8 text: the error names the file."""
    from workers.data.corpus import CorpusError, load_corpus
    from workers.model.checkpoint import CheckpointError, load_config
    from workers.model.hf import HFModelError
    from workers.model.hf.address import load_tokenizer

    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(HFModelError, match=r"m/config.json: not a JSON config"):
        load_tokenizer(f"hf:{bad}")
    with pytest.raises(CheckpointError, match=r"m/config.json is not a JSON config"):
        load_config(str(bad))
    binary = tmp_path / "c.txt"
    binary.write_bytes(b"text \xff\xfe more")
    with pytest.raises(CorpusError, match=r"c.txt'.*not UTF-8 text .* at byte 5"):
        load_corpus(str(binary))
