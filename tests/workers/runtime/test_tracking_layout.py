"""The MLflow layout a user browses: one experiment per pipeline, versions on every run, the demo's
runs nested under one parent (real MLflow, the session's SQLite store)."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from workers.runtime import tracking


@pytest.fixture
def client(mlflow_uri):
    return MlflowClient(mlflow_uri)


def test_a_pipeline_run_lands_in_its_own_experiment_with_the_versions_that_made_it(client):
    import torch
    import transformers

    with tracking.start_run("layout_probe_pipeline") as run:
        pass
    got = client.get_run(run.info.run_id)
    assert client.get_experiment(got.info.experiment_id).name == "layout_probe_pipeline"
    assert got.data.tags["version.torch"] == torch.__version__
    assert got.data.tags["version.transformers"] == transformers.__version__
    assert got.data.tags["version.mlflow"] == mlflow.__version__
    assert {f"version.{p}" for p in tracking.VERSIONED} <= set(got.data.tags)


def test_runs_inside_nested_under_are_children_in_the_parents_experiment(client):
    exp = tracking.setup("layout-demo")
    parent = client.create_run(exp, run_name="demo-parent").info.run_id
    with (
        tracking.nested_under(parent, "layout-demo"),
        tracking.start_run("layout_child_pipeline", experiment="elsewhere", run_name="child") as child,
    ):
        pass
    with tracking.start_run("layout_child_pipeline") as after:  # outside the block: its own experiment again
        pass
    got = client.get_run(child.info.run_id)
    assert got.info.experiment_id == exp
    assert got.data.tags["mlflow.parentRunId"] == parent
    assert "mlflow.parentRunId" not in client.get_run(after.info.run_id).data.tags
    assert client.get_experiment(client.get_run(after.info.run_id).info.experiment_id).name == "layout_child_pipeline"


def test_a_moved_store_finds_its_artifacts(tmp_path, monkeypatch):
    import shutil

    a = tmp_path / "a"
    a.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{a / 'mlruns.db'}")
    with tracking.start_run("moved_store_probe") as run:
        mlflow.log_text("kept", "notes/kept.txt")
    shutil.move(str(a), str(tmp_path / "b"))  # the whole store: database and mlartifacts/
    b_uri = f"sqlite:///{tmp_path / 'b' / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", b_uri)
    assert tracking.relocate(b_uri) == (a / "mlartifacts").as_uri()
    assert tracking.download(f"runs:/{run.info.run_id}/notes/kept.txt").read_text() == "kept"
    assert MlflowClient(b_uri).get_run(run.info.run_id).info.artifact_uri.startswith((tmp_path / "b").as_uri())
    assert tracking.relocate(b_uri) is None  # nothing left to move


def test_the_next_demo_marks_runs_a_killed_demo_left_running_failed(client):
    from pipelines.demo import close_killed

    exp = tracking.setup("layout-killed-demo")
    killed = client.create_run(exp, run_name="demo-full").info.run_id  # never terminated: a kill
    done = client.create_run(exp, run_name="demo-full").info.run_id
    client.set_terminated(done, "FINISHED")
    assert close_killed(client, exp) == [killed]
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(done).info.status == "FINISHED"


def test_a_resume_marks_the_killed_run_and_the_trials_it_was_writing_failed(client):
    """A sweep killed outright leaves its parent and its live Tune trial runs RUNNING; resuming the
    parent marks both FAILED (the retried trial gets a new child run), finished children stay."""
    exp = tracking.setup("layout-resume")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    live = client.create_run(exp, run_name="trial-live", tags={"mlflow.parentRunId": parent}).info.run_id
    done = client.create_run(exp, run_name="trial-done", tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(done, "FINISHED")
    other = client.create_run(exp, run_name="someone-elses").info.run_id
    tracking.mark_failed_if_running(parent)
    status = {r: client.get_run(r).info.status for r in (parent, live, done, other)}
    assert status == {parent: "FAILED", live: "FAILED", done: "FINISHED", other: "RUNNING"}
