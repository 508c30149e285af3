"""benchmarks.kv_retrieval: the paired table it reports and its up-front refusals (the shared
prefill it evaluates through is tested in test_prefixkv_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.kv_retrieval import markdown, summarize


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


def _artifact(pool: int, n_layers: int = 3):
    from tuning.prefixkv.search import RATIO_GRID
    from workers.prefixkv.artifact import PrefixKVArtifact

    fr = [[min(1.0, r * (0.5 + i / (n_layers - 1))) for i in range(n_layers)] for r in RATIO_GRID]
    return PrefixKVArtifact(
        {
            "version": 1,
            "model": "m",
            "n_layers": n_layers,
            "n_sink": 2,
            "ratios": list(RATIO_GRID),
            "default_score": "window",
            "window": 8,
            "pool": pool,
            "scores": {"window": {"fractions": fr}},
        }  # fmt: skip
    )


def test_several_prefixkv_files_are_scored_side_by_side_and_paired_with_their_own_uniform():
    from benchmarks.kv_retrieval import evict_arms

    arms = evict_arms({"pool1": _artifact(1), "pool5": _artifact(5)}, [0.2], 3)
    assert set(arms) == {
        "prefixkv-window@0.2 [pool1]", "uniform-window@0.2 [pool1]", "pyramid-window@0.2 [pool1]",
        "prefixkv-window@0.2 [pool5]", "uniform-window@0.2 [pool5]", "pyramid-window@0.2 [pool5]",
        "recency@0.2",
    }  # fmt: skip
    assert arms["uniform-window@0.2 [pool5]"].score.pool == 5 and arms["uniform-window@0.2 [pool1]"].score.pool == 1
    one = evict_arms({"": _artifact(1)}, [0.2, 0.5], 3)  # one unlabelled file: the plain names of earlier runs
    assert "prefixkv-window@0.5" in one and "recency@0.5" in one
    rows = {
        r["arm"]: r
        for r in summarize(
            {
                "full": [1, 1, 1, 1],
                "prefixkv-window@0.2 [pool5]": [1, 1, 1, 0],
                "uniform-window@0.2 [pool5]": [1, 0, 0, 0],
                "uniform-window@0.2 [pool1]": [1, 1, 1, 1],
            }
        )
    }
    assert rows["prefixkv-window@0.2 [pool5]"]["minus_uniform"] == pytest.approx(0.5)  # its own file's uniform
    res = {
        "model": "m", "n": 4, "length": 64, "records": [2, 4], "corpus": "pydoc", "calib_n": 8, "calib_em": {"64": 1.0},
        "kvtuner_run": None, "prefixkv": {"pool1": "a.json", "pool5": "b.json"}, "rows": list(rows.values()),
    }  # fmt: skip
    text = markdown(res)
    assert "no KVTuner run; PrefixKV pool1 = `a.json`, pool5 = `b.json`." in text
    assert "| prefixkv-window@0.2 [pool5] | 4 | 0.750" in text


def test_prefixkv_labels_and_model_checks():
    from benchmarks.kv_retrieval import model_address, parse_prefixkv

    assert parse_prefixkv(["runs:/abc/prefixkv.json"]) == {"": "runs:/abc/prefixkv.json"}
    assert parse_prefixkv(["a=x.json", "b=y=z.json"]) == {"a": "x.json", "b": "y=z.json"}
    with pytest.raises(ValueError, match="each must be LABEL=FILE"):
        parse_prefixkv(["x.json", "y.json"])
    with pytest.raises(ValueError, match="label 'a' given twice"):
        parse_prefixkv(["a=x.json", "a=y.json"])
    assert model_address({}, {"a": _artifact(1)}) == "m"
    with pytest.raises(ValueError, match="must name one model"):
        model_address({"model": "other"}, {"a": _artifact(1)})


def test_without_kvtuner_a_missing_prefixkv_file_is_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    argv = ["--prefixkv", str(tmp_path / "nope.json"), "--work-dir", str(tmp_path / "w")]
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.kv_retrieval", *argv], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "w").exists()
    assert f"--prefixkv {tmp_path / 'nope.json'}" in r.stderr.strip().splitlines()[-1]
