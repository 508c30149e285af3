"""train_moe killed outright (issue 17): a SIGKILLed driver or Ray Train worker loses no model.

Each run is a real driver process (its own local Ray, as a user's ``python -m pipelines.train_moe``)
killed with SIGKILL from outside, timed on what it left in storage or MLflow (polled), so nothing
of its shutdown runs: a killed driver's MLflow run stays RUNNING.
"""

from __future__ import annotations

import json
import signal
import sys

import ray.train
import torch
from mlflow.tracking import MlflowClient

from pipelines import train_moe
from tests.procs import driver, wait_for
from tests.training import golden
from workers.model import checkpoint
from workers.training import train_state
from workers.training.config import tiny

DRIVER = """
import json, sys
from pipelines import train_moe
from workers.training.config import TrainConfig
tc = TrainConfig.from_dict(json.loads(sys.argv[1]))
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
train_moe.run(tc, experiment=sys.argv[2], storage_uri=sys.argv[3], extra=extra)
"""


def _driver(tc, experiment: str, storage, log, extra: dict | None = None):
    args = [sys.executable, "-c", DRIVER, json.dumps(tc.to_dict()), experiment, str(storage)]
    return driver(args + ([json.dumps(extra)] if extra else []), log)


def _checkpoint(storage) -> tuple[str, int] | None:
    """(URI, step) of the newest complete checkpoint of the one Ray Train run under ``storage``."""
    found = [c for run in storage.glob("train-*") if (c := train_state.newest_complete(str(run)))]
    return max(found, key=lambda c: c[1]) if found else None


def _only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_driver_killed_after_the_last_checkpoint_resumes_without_training(mlflow_uri, tmp_path):
    tc = tiny().replace(steps=8, ckpt_every=4, log_every=2, eval_windows=8, cpus_per_worker=0.5)
    experiment, storage = "test-kill-driver", tmp_path / "storage"
    with _driver(tc, experiment, storage, tmp_path / "driver.log") as proc:
        # the last checkpoint whole in storage: the driver is killed before its evaluation and model upload
        uri, step = wait_for(
            lambda: (c := _checkpoint(storage)) and c[1] == tc.steps and c, proc, 300, "final checkpoint"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    client = MlflowClient(mlflow_uri)
    killed = _only_run(client, experiment)
    assert killed.info.status == "RUNNING"  # what kill -9 leaves
    assert "model" not in {a.path for a in client.list_artifacts(killed.info.run_id)}

    resumed = train_moe.run(tc, experiment=experiment, resume=killed.info.run_id)
    run = client.get_run(resumed)
    assert run.info.status == "FINISHED"
    assert client.get_run(killed.info.run_id).info.status == "FAILED"  # not left RUNNING
    assert run.data.tags["resumed_from"] == killed.info.run_id and run.data.tags["resumed_at_step"] == str(step)
    assert run.data.tags["ray_storage"] == str(storage)  # found from the killed run's tags, not given again
    assert client.get_metric_history(resumed, "train_loss") == []  # no fit: nothing was left to train
    # the logged model is the final checkpoint, bit for bit
    want = train_state.load_model_state(train_state.local_dir(ray.train.Checkpoint(uri)))
    got = checkpoint.load(f"runs:/{resumed}/model").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "heldout_bpb" in run.data.metrics


def test_worker_killed_mid_run_restarts_from_its_checkpoint(mlflow_uri, tmp_path):
    tc = golden.ray_configs()["ddp2"]  # 2 workers, 12 steps, checkpoints at 6 and 12: its uninterrupted curve
    experiment, storage = "test-kill-worker", tmp_path / "storage"
    client = MlflowClient(mlflow_uri)

    # The last rank dies outright right after step 8 (ray_train.CrashAt, once): killing it from here once
    # step 8 was logged raced the step-12 checkpoint on a loaded machine.
    extra = {"crash_at_step": 8, "crash_marker": str(tmp_path / "killed")}
    with _driver(tc, experiment, storage, tmp_path / "driver.log", extra) as proc:
        wait_for(lambda: (tmp_path / "killed").exists(), proc, 300, "the worker killed after step 8")
        on_disk = _checkpoint(storage)
        assert proc.wait(timeout=300) == 0
    assert on_disk is not None and on_disk[1] == 6, on_disk
    run = _only_run(client, experiment)
    assert run.info.status == "FINISHED"
    restarts = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert restarts == [6.0]  # restarted once, from the checkpoint, not from step 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == [2, 4, 6, 8, 10, 12]  # each step logged once, the re-run steps 7-8 included
    # the uninterrupted run's curve (golden.match: its tolerance for routed models)
    assert golden.match(golden.logged_curve(client, run.info.run_id), golden.load()["ray_train"]["ddp2"])
    assert checkpoint.load(f"runs:/{run.info.run_id}/model").cfg == tc.model
