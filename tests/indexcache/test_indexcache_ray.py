"""Calibration actors and the driver: actor death, stop + resume, MLflow reports (real Ray, real MLflow)."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import ray

from pipelines.indexcache import IndexCacheConfig, SearchStopped, main, resume_config, run
from tuning.indexcache.cost import analytic_units
from tuning.indexcache.losses import reduce_shards
from tuning.indexcache.search import SearchState, greedy_search
from workers.indexcache.actor import CalibrationPool, split_rows
from workers.indexcache.evaluate import ShardEvaluator


@pytest.fixture(scope="module")
def calib(corpus):
    return corpus.eval_windows("calib", 65, 6)


def _pool(model, windows):
    return CalibrationPool(model, windows, 2, batch_size=4, num_cpus=0.25)


def test_killing_an_actor_mid_search_does_not_change_the_result(ray_local, tiny_trained, calib):
    model = tiny_trained[1]
    pool = _pool(model, calib)
    clean = greedy_search(SearchState(4, (0.25,)), pool)
    assert pool.units() == analytic_units(clean, pool.rows, pool.total_rows())
    pool.shutdown()

    pool = _pool(model, calib)
    victims = []

    def kill_one(state, record):
        if record.step == 1:
            victims.append(pool.actors[1])
            ray.kill(pool.actors[1], no_restart=True)

    killed = greedy_search(SearchState(4, (0.25,)), pool, on_step=kill_one)
    assert victims and pool.replacements == 1 and pool.actors[1] is not victims[0]
    assert killed.pattern == clean.pattern
    assert [s.to_dict()["rungs"] for s in killed.steps] == [s.to_dict()["rungs"] for s in clean.steps]
    pool.shutdown()


class _InProcessShards:
    """The pool's shards scored in this process, reduced the same way: what the pool must reproduce."""

    def __init__(self, model, windows, n_shards: int, batch_size: int):
        self.n_layers = len(model.layers)
        rows = split_rows(windows.shape[0], n_shards)
        self.shards = [ShardEvaluator(model, windows[r].clone(), batch_size=batch_size) for r in rows]

    def units(self) -> int:
        return sum(e.units() for e in self.shards)

    def reset(self, pattern):
        return reduce_shards([{0: e.reset(pattern)} for e in self.shards])[0]

    def evaluate(self, candidates, fraction):
        return reduce_shards([e.evaluate(candidates, fraction) for e in self.shards])

    def commit(self, layer) -> None:
        for e in self.shards:
            e.commit(layer)


def test_pool_search_equals_the_same_shards_in_process(ray_local, tiny_trained, calib):
    model = tiny_trained[1]
    own_copy = ray.get(ray.put(model))  # what an actor receives; the session's model stays as it is
    local = greedy_search(SearchState(4, (0.25,)), _InProcessShards(own_copy, calib, 2, 4))
    pool = _pool(model, calib)
    remote = greedy_search(SearchState(4, (0.25,)), pool)
    pool.shutdown()
    assert remote.pattern == local.pattern
    assert remote.baseline == local.baseline  # LossSum: (sum NLL, tokens), bit for bit
    assert [s.to_dict() for s in remote.steps] == [s.to_dict() for s in local.steps]  # losses, rungs, units


def _cfg(model_dir, **kw):
    base = dict(
        model=str(model_dir),
        retentions=(0.5, 0.25),
        workers=2,
        seq_len=64,
        calib_windows=6,
        heldout_windows=6,
        batch_size=4,
        worker_cpus=0.25,
        experiment="indexcache-tests",
    )
    return IndexCacheConfig(**{**base, **kw})


def test_stop_and_resume_equals_uninterrupted_and_reports(ray_local, mlflow_uri, tiny_checkpoint):
    full = run(_cfg(tiny_checkpoint))
    with pytest.raises(SearchStopped, match="--resume"):
        run(_cfg(tiny_checkpoint, max_steps=1))
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    stopped = client.search_runs(
        [client.get_experiment_by_name("indexcache-tests").experiment_id], order_by=["start_time DESC"]
    )[0]
    assert stopped.info.status == "FAILED"
    cfg, state = resume_config(stopped.info.run_id, max_steps=0, distill_steps=2)
    assert len(state.steps) == 1
    resumed = run(cfg, resume=stopped.info.run_id, state=state)
    assert resumed["run_id"] == stopped.info.run_id
    assert resumed["pattern"] == full["pattern"]
    assert [s["committed"] for s in resumed["indexcache"]["trace"]] == [
        s["committed"] for s in full["indexcache"]["trace"]
    ]
    assert client.get_run(stopped.info.run_id).info.status == "FINISHED"

    # Reports: per-retention comparison, trace with gaps, overlap table + heatmap, indexcache.json.
    run_id = full["run_id"]
    files = {f.path for f in client.list_artifacts(run_id, "indexcache")}
    assert {"indexcache/trace.json", "indexcache/retentions.json", "indexcache/overlap.json"} <= files
    assert "indexcache/overlap_heatmap.png" in files
    doc = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/indexcache.json"))
    assert doc["patterns"]["0.25"]["searched"]["pattern"].count("F") == 1
    assert doc["patterns"]["0.5"]["uniform"]["pattern"] == "FSFS"
    assert doc["patterns"]["0.25"]["searched"]["indexer_work_removed_measured"] == 0.75
    assert all(s["gap"] is None or s["gap"] >= 0 for s in doc["trace"])
    metrics = client.get_run(run_id).data.metrics
    for key in (
        "r0.25/searched_heldout_nll",
        "r0.25/uniform_heldout_nll",
        "all_f/heldout_nll",
        "r0.25/searched_minus_uniform_se",
        "search/cost_ratio_vs_naive",
        "overlap/adjacent_mean",
    ):
        assert key in metrics
    assert metrics["search/total_layer_forwards"] == metrics["search/analytic_layer_forwards"]
    distilled = resumed["indexcache"]["patterns"]["0.25"]["distilled"]
    assert set(distilled) == {"searched", "uniform", "searched_minus_uniform", "searched_minus_uniform_se"}
    assert math.isfinite(distilled["searched_minus_uniform"]) and distilled["searched_minus_uniform_se"] >= 0


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="retention must be in"):
        IndexCacheConfig(model="x", retentions=(0.25, 0.0))
    with pytest.raises(ValueError, match="calib_windows"):
        IndexCacheConfig(model="x", workers=8, calib_windows=4)
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        main(["--model", str(tmp_path / "nope"), "--retention", "0.25"])
