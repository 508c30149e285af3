"""`python -m pipelines.dsa_convert` on the trained tiny dense fixture (real Ray Train, real MLflow),
then the IndexCache search on the converted model; and the CLI's refusals of bad input.

A random model's attention is near uniform (nothing for an indexer to learn), and so is the shared
60-step tiny dense fixture's (3.3 nats/byte, worse than unigram; its indexer KL starts at 0.018 and
random-k costs it 1e-4 nats). This module trains the same tiny dense model 300 steps at L = 128
(about 10 s, 2.0 nats/byte): it reads its context (random-k costs it 0.33 nats at k = 16), so its
converted indexer must both lower its KL (measured 1.48 -> 0.26) and beat k random positions.
"""

from __future__ import annotations

import json

import mlflow
import pytest

from pipelines import dsa_convert, indexcache
from workers.runtime import cli, tracking


@pytest.fixture(scope="module")
def dense_dir(corpus, tmp_path_factory):
    from workers.model.hf.export import export_llama
    from workers.model.presets import tiny as tiny_model
    from workers.training.config import tiny
    from workers.training.loop import train_local

    tc = tiny().replace(
        model=tiny_model().replace(indexer=None, moe=None), dense_warmup_steps=0, steps=300, seq_len=128
    )
    model, _ = train_local(tc, corpus.tokens("train"), corpus.train)
    return export_llama(model, tmp_path_factory.mktemp("dense_hf_convert"))


@pytest.fixture(scope="module")
def converted(ray_local, mlflow_uri, dense_dir):
    cfg = dsa_convert.ConvertConfig(
        model=f"hf:{dense_dir}",
        corpus="pydoc",
        seq_len=128,  # k = L/8 = 16; the quality table adds L/4 = 32
        index_heads=2,
        index_dim=16,
        index_rope_dim=8,
        steps=40,
        batch_size=8,
        lr=3e-3,
        heldout_windows=48,
        kl_windows=8,
        cpus_per_worker=1,
        threads=1,
        experiment="dsa-convert-tests",
    )
    return dsa_convert.run(cfg)


def test_conversion_lowers_the_kl_and_beats_random_k(converted, mlflow_uri):
    run = mlflow.tracking.MlflowClient(mlflow_uri).get_run(converted["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["topk"] == "16"
    m = converted["metrics"]
    assert m["heldout/indexer_kl_after"] < 0.8 * m["heldout/indexer_kl_before"]
    assert m["warmup/train_kl_last"] < m["warmup/train_kl_first"]
    q = converted["quality"]
    assert set(q["k"]) == {16, 32} and q["windows"] == 48
    for k in (16, 32):
        d = q["k"][k]["sparse_minus_random"]
        assert d["mean"] < -2 * d["se"], (k, d)  # own indexer beats k random positions, > 2 SE
    layer_kl = json.loads(mlflow.artifacts.load_text(f"runs:/{converted['run_id']}/dsa/layer_kl.json"))
    assert len(layer_kl["data"]) == 4


def test_indexcache_searches_the_converted_model(converted, mlflow_uri):
    cfg = indexcache.IndexCacheConfig(
        model=converted["model"],
        retentions=(0.5, 0.25),
        workers=2,
        seq_len=128,
        calib_windows=4,
        heldout_windows=8,
        batch_size=4,
        worker_cpus=0.25,
        multi_fidelity=True,
        experiment="dsa-convert-tests",
    )
    summary = indexcache.run(cfg)
    assert summary["pattern"].count("F") == 1 and summary["pattern"][0] == "F"
    assert summary["cost"]["search/total_layer_forwards"] == summary["cost"]["search/analytic_layer_forwards"]
    for entry in summary["retentions"]:
        searched = entry["searched"]
        assert searched["indexer_work_removed_measured"] == searched["indexer_work_removed"]

    # The training-aware variant on the converted model, in a new run that reuses this search.
    out = indexcache.main(
        ["--from-search", summary["run_id"], "--distill-steps", "3", "--distill-batch", "2"]
        + ["--distill-retention", "0.5", "--no-overlap", "--worker-cpus", "0.25"]
    )
    assert out["run_id"] != summary["run_id"] and out["pattern"] == summary["pattern"]
    run = mlflow.tracking.MlflowClient(mlflow_uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["search_from"] == summary["run_id"]
    assert run.data.metrics["search/steps_this_run"] == 0  # the search was reused, not rerun
    assert run.data.params["distill_steps"] == "3" and run.data.params["heldout_windows"] == "8"
    half = next(e for e in out["retentions"] if e["retention"] == 0.5)
    for kind in ("searched", "uniform"):
        d = half["distilled"][kind]
        assert d["pattern"] == half[kind]["pattern"] and d["kl_last"] < d["kl_first"]
        assert d["minus_training_free"] != 0.0  # trained indexers change the held-out NLL
    gap = half["distilled"]["searched_minus_uniform"]
    assert gap == pytest.approx(
        half["distilled"]["searched"]["heldout_nll"] - half["distilled"]["uniform"]["heldout_nll"]
    )
    assert (
        run.data.metrics["r0.5/distilled_searched_minus_uniform_se"] == half["distilled"]["searched_minus_uniform_se"]
    )
    assert "distilled" not in next(e for e in out["retentions"] if e["retention"] == 0.25)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of the command line, in-process (workers.runtime.cli.run)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run(dsa_convert.main, list(args))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--seq-len", "64", "--topk", "64"], "topk=64"),
        (["--seq-len", "4096"], "seq_len=4096"),
        (["--index-rope-dim", "3"], "indexer.rope_dim=3"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(dense_dir, capsys, args, needle):
    started = tracking.runs_started()
    code, err = _cli(capsys, "--model", f"hf:{dense_dir}", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert tracking.runs_started() == started  # refused before any MLflow run (or Ray) started


def test_a_converted_or_calib_model_is_refused(converted, tiny_dense_checkpoint, capsys):
    code, err = _cli(capsys, "--model", str(tiny_dense_checkpoint))
    assert code == 2 and "is a CalibLM checkpoint" in err, err
    code, err = _cli(capsys, "--model", converted["model"])
    assert code == 2 and "already has lightning indexers" in err, err
