"""The PrefixKV driver SIGKILLed mid-calibration (issue 17): `--resume` skips the samples that reached
MLflow, computes the rest, and logs the calibration an uninterrupted run logs; an actor SIGKILLed after
calibrating a batch changes nothing (`slow`: the CI kill test is IndexCache's,
tests/indexcache/test_indexcache_kill.py)."""

from __future__ import annotations

import mlflow
import pytest

from pipelines import prefixkv
from tests.prefixkv.test_prefixkv_pipeline import _args
from tests.procs import cli, killed_at
from workers.prefixkv import artifact

pytestmark = pytest.mark.slow


def test_driver_killed_after_a_batch_resumes_to_the_uninterrupted_calibration(ray_local, mlflow_uri, tiny_checkpoint):
    args = _args(tiny_checkpoint, "--workers", "1", "--eval-samples", "0", "--experiment", "prefixkv-kill-tests")
    killed_at("prefixkv.batch_saved:1", "pipelines.prefixkv", args, {"MLFLOW_TRACKING_URI": mlflow_uri})
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("prefixkv-kill-tests")
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "RUNNING" and killed.data.metrics["samples_done"] == 2  # one batch of 2

    prefixkv.main([*args, "--resume", killed.info.run_id])
    full = prefixkv.main(args)
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    done = [m.value for m in client.get_metric_history(killed.info.run_id, "samples_done")]
    assert sorted(done) == [2, 4]  # the first batch was not recomputed
    resumed = artifact.load(f"runs:/{killed.info.run_id}/prefixkv.json").data["scores"]
    assert resumed == artifact.load(f"runs:/{full}/prefixkv.json").data["scores"]


def test_an_actor_killed_after_a_batch_changes_nothing(ray_local, mlflow_uri, tiny_checkpoint, tmp_path):
    """The actor dies after calibrating its first batch, before returning it: Ray restarts it and the
    batch is calibrated again, so the run ends with the uninterrupted run's scores."""
    args = _args(tiny_checkpoint, "--workers", "1", "--eval-samples", "0", "--experiment", "prefixkv-actor-kill")
    marker = tmp_path / "fired"
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "CALIBRAY_FAULT": "prefixkv.actor_batch:1"}
    cli("pipelines.prefixkv", args, {**env, "CALIBRAY_FAULT_ONCE": str(marker)})
    assert marker.exists()  # the actor reached the point and was SIGKILLed
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("prefixkv-actor-kill").experiment_id])
    assert killed.info.status == "FINISHED"
    full = prefixkv.main(args)
    scores = lambda run: artifact.load(f"runs:/{run}/prefixkv.json").data["scores"]
    assert scores(killed.info.run_id) == scores(full)
