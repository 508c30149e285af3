"""The KVTuner driver SIGKILLed (issue 17) after its profile was saved, and in the middle of the Ray
Tune search: rerunning the same command resumes the same MLflow run from --work-dir and chooses the
maps an uninterrupted run chooses. A profile actor or a Tune trial's actor SIGKILLed mid-search: the
run goes on (the pool replaces the actor, Tune reruns the trial) to the uninterrupted result. One trial at a time (`--actors 1`) with a fixed seed: with
concurrent trials the proposals depend on the order trials complete in (`slow`; the CI kill test is
IndexCache's)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipelines import kvtuner
from tests.kvtuner.test_kvtuner_pipeline import ARGS
from tests.procs import cli, killed_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    return tiny_llama_dir("kvt_llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3)


@pytest.fixture(scope="module")
def uninterrupted(hf_llama, tmp_path_factory, ray_local, mlflow_uri):
    work = tmp_path_factory.mktemp("kvt_full")
    return kvtuner.main(["--model", f"hf:{hf_llama}", *ARGS, "--work-dir", str(work)]), work


@pytest.mark.parametrize("point", ["kvtuner.profile_saved:1", "kvtuner.trial_done:2"])
def test_driver_killed_resumes_to_the_uninterrupted_choice(point, hf_llama, uninterrupted, tmp_path, mlflow_uri):
    full, full_work = uninterrupted
    work = tmp_path / "work"
    argv = ["--model", f"hf:{hf_llama}", *ARGS, "--work-dir", str(work)]
    killed_at(point, "pipelines.kvtuner", argv, {"MLFLOW_TRACKING_URI": mlflow_uri})
    run_id = (work / "run_id").read_text().strip()
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    profile_mtime = (work / "profile.json").stat().st_mtime
    if point.startswith("kvtuner.trial_done"):
        from ray import tune

        assert tune.Tuner.can_restore(str(work / "tune" / "search"))  # resumed by Tuner.restore

    resumed = kvtuner.main(argv)
    assert resumed["run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert (work / "profile.json").stat().st_mtime == profile_mtime  # the profile was not recomputed
    assert resumed["chosen"] == full["chosen"]
    rows = lambda w: sorted(map(json.dumps, json.loads((w / "out" / "search_rows.json").read_text())["rows"]))
    assert rows(work) == rows(full_work)  # the same maps evaluated, with the same numbers


def _outputs(work):
    """What a run decided and measured: every evaluated map's calibration numbers, the front, the
    baselines, and the held-out report of the chosen maps."""
    read = lambda name: json.loads((work / "out" / name).read_text())
    return {**read("search_rows.json"), "report": read("report.json")}


@pytest.mark.parametrize("point", ["kvtuner.actor_job:3", "kvtuner.trial_step:2"])
def test_an_actor_killed_mid_search_changes_nothing(point, hf_llama, uninterrupted, tmp_path, mlflow_uri):
    """actor_job:3: the profile actor dies after its 3rd probe (the pool replaces it and repeats the
    probe); trial_step:2: the 2nd Tune trial's actor dies after evaluating its map (Tune reruns it)."""
    _, full_work = uninterrupted
    work, marker = tmp_path / "work", tmp_path / "fired"
    argv = ["--model", f"hf:{hf_llama}", *ARGS, "--work-dir", str(work)]
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "CALIBRAY_FAULT": point, "CALIBRAY_FAULT_ONCE": str(marker)}
    cli("pipelines.kvtuner", argv, env)
    assert marker.exists()  # an actor reached the point and was SIGKILLed
    run_id = (work / "run_id").read_text().strip()
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    assert _outputs(work) == _outputs(full_work)
