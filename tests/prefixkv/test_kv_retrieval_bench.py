"""benchmarks.kv_retrieval: the paired table it reports and its up-front refusals (the shared
prefill it evaluates through is tested in test_prefixkv_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.kv_retrieval import summarize


def test_summary_pairs_each_arm_with_full_and_prefixkv_with_uniform_at_its_ratio():
    hits = {
        "full": [1, 1, 1, 0],
        "KV2": [1, 0, 1, 0],
        "prefixkv-window@0.2": [1, 1, 0, 0],
        "uniform-window@0.2": [0, 1, 0, 0],
        "uniform-window@0.5": [1, 1, 1, 1],
        "quanto 4-bit": [1, 1],  # an external arm on the first queries only: paired on those
    }
    rows = {r["arm"]: r for r in summarize(hits)}
    assert rows["full"]["em"] == 0.75 and "minus_full" not in rows["full"]
    assert rows["KV2"]["minus_full"] == pytest.approx(-0.25)
    assert rows["prefixkv-window@0.2"]["minus_uniform"] == pytest.approx(0.25)
    assert "minus_uniform" not in rows["uniform-window@0.5"]
    assert rows["quanto 4-bit"]["n"] == 2 and rows["quanto 4-bit"]["minus_full"] == 0.0


def _run(tmp_path, *extra):
    """The benchmark on a finished-looking KVTuner work dir whose run is not in the (empty) store."""
    work = tmp_path / "kvt"
    (work / "out").mkdir(parents=True)
    (work / "run_id").write_text("0" * 32)
    (work / "out" / "report.json").write_text("{}")
    argv = ["--kvtuner", str(work), "--prefixkv", str(tmp_path / "p.json"), "--work-dir", str(tmp_path / "w")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.kv_retrieval", *argv, *extra], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()  # refused before any work
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra, match", [(["--ratios", "1.5"], "--ratios 1.5"), (["--n", "0"], "--n=0"), (["--min-em", "0"], "--min-em=0")]
)
def test_bad_input_is_one_line_before_any_work(tmp_path, extra, match):
    assert match in _run(tmp_path, *extra)


def test_a_kvtuner_run_of_another_store_is_refused(tmp_path):
    assert "no such run" in _run(tmp_path)
