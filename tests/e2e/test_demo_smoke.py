"""The demo a newcomer runs, at smoke scale, from a clean MLflow store, killed outright after its
second stage and resumed (slow: about 3 minutes)."""

import json
import os
import signal
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from workers.runtime import tracking
from workers.stats import VERDICTS

pytestmark = pytest.mark.slow


def test_smoke_demo_from_a_clean_store_killed_and_resumed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CALIBRAY_STORAGE": str(tmp_path / "ray")}
    demo = [sys.executable, "-m", "pipelines.demo", "--preset", "smoke"]
    first = subprocess.Popen(
        demo, env=env, cwd=tracking.REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    head = []
    for line in first.stdout:  # the console: one line per finished stage
        head.append(line)
        if line.startswith("[2/"):
            os.killpg(first.pid, signal.SIGKILL)  # killed outright, as the third stage starts
            break
    first.wait(timeout=60)
    assert head[0].startswith("calibray demo (smoke), MLflow run "), head
    parent_id = head[0].split("MLflow run ")[1].split()[0]

    proc = subprocess.run(
        [*demo, "--resume", parent_id],
        env=env,
        cwd=tracking.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [x for x in proc.stdout.splitlines() if "reused" in x and x.startswith(("[1/", "[2/"))], proc.stdout
    console = proc.stdout.splitlines()
    assert len(console) < 200, len(console)
    assert not any("WARNING" in line or "Warning:" in line for line in console), "warnings reached the console"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # read back what the demo wrote, in its store
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.pipeline = 'demo'")
    assert parent.info.status == "FINISHED" and parent.info.run_id == parent_id
    summary = json.loads(tracking.download(f"runs:/{parent.info.run_id}/summary.json").read_text())
    rows = summary["table"]
    assert len(rows) >= 8
    for row in rows:
        assert row["verdict"] in VERDICTS, row
        assert row["run_id"] == "serve" or client.get_run(row["run_id"]).info.status == "FINISHED", row
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["pipeline"] for c in children} >= {"train_moe", "indexcache", "kvtuner", "prefixkv"}
    once = [c.data.tags["pipeline"] for c in children if c.data.tags["pipeline"] in ("train_moe", "indexcache")]
    assert sorted(once) == ["indexcache", "train_moe"]  # finished before the kill: not run again
    for c in children:
        assert c.data.tags["version.torch"] and c.data.tags["version.mlflow"] == mlflow.__version__
        assert c.info.run_name.startswith("demo-smoke-"), c.info.run_name  # says what ran

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{summary['runs']['train_moe']}/mlflow_model")
    (text,) = model.predict({"prompt": ["The with statement"]}, params={"max_new_tokens": 8})
    assert isinstance(text, str) and len(text) >= 1
