"""The IndexCache driver SIGKILLed mid-search (issue 17): `--resume` ends where an uninterrupted run ends.

The driver is a real `python -m pipelines.indexcache` process killed by `kill -9` semantics at a named
point (`workers.runtime.faults`: right after step 1's state reached MLflow), so nothing of its
shutdown runs: the MLflow run stays RUNNING and its Ray actors die with it.
"""

from __future__ import annotations

import json

import mlflow

from pipelines.indexcache import STATE_ARTIFACT, main, run
from tests.indexcache.test_indexcache_ray import _cfg
from tests.procs import killed_at

EXPERIMENT = "indexcache-kill-tests"


def _args(model_dir) -> list[str]:
    return [
        *("--model", str(model_dir), "--retention", "0.5", "0.25", "--workers", "2", "--seq-len", "64"),
        *("--calib-windows", "6", "--heldout-windows", "6", "--batch-size", "4", "--worker-cpus", "0.25"),
        *("--no-overlap", "--experiment", EXPERIMENT),
    ]


def test_driver_killed_after_a_step_resumes_to_the_uninterrupted_result(ray_local, mlflow_uri, tiny_checkpoint):
    killed_at(
        "indexcache.step_saved:1", "pipelines.indexcache", _args(tiny_checkpoint), {"MLFLOW_TRACKING_URI": mlflow_uri}
    )

    client = mlflow.tracking.MlflowClient(mlflow_uri)
    killed = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    assert killed.info.status == "RUNNING"  # a kill -9 leaves the run as it was
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{killed.info.run_id}/{STATE_ARTIFACT}"))
    assert len(saved["steps"]) == 1

    resumed = main(["--resume", killed.info.run_id, "--worker-cpus", "0.25"])
    full = run(_cfg(tiny_checkpoint, overlap=False, experiment=EXPERIMENT))
    assert resumed["run_id"] == killed.info.run_id
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    assert resumed["pattern"] == full["pattern"]
    trace = [(s["committed"], s["loss"]) for s in resumed["indexcache"]["trace"]]
    assert trace == [(s["committed"], s["loss"]) for s in full["indexcache"]["trace"]]  # bit for bit
    assert resumed["cost"]["search/steps_this_run"] == len(trace) - 1  # step 1 was not redone
    losses = client.get_metric_history(killed.info.run_id, "search/loss")
    assert sorted(m.step for m in losses) == list(range(1, len(trace) + 1))  # each step logged once
