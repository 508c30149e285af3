"""The demo a newcomer runs, at smoke scale, from a clean MLflow store (slow: about 3 minutes)."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from workers.runtime import tracking
from workers.stats import VERDICTS

pytestmark = pytest.mark.slow


def test_smoke_demo_from_a_clean_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CALIBRAY_STORAGE": str(tmp_path / "ray")}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--preset", "smoke"],
        env=env,
        cwd=tracking.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout.splitlines()
    assert len(console) < 200, len(console)
    assert not any("WARNING" in line or "Warning:" in line for line in console), "warnings reached the console"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # read back what the demo wrote, in its store
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.pipeline = 'demo'")
    assert parent.info.status == "FINISHED"
    summary = json.loads(tracking.download(f"runs:/{parent.info.run_id}/summary.json").read_text())
    rows = summary["table"]
    assert len(rows) >= 8
    for row in rows:
        assert row["verdict"] in VERDICTS, row
        assert row["run_id"] == "serve" or client.get_run(row["run_id"]).info.status == "FINISHED", row
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["pipeline"] for c in children} >= {"train_moe", "indexcache", "kvtuner", "prefixkv"}
    for c in children:
        assert c.data.tags["version.torch"] and c.data.tags["version.mlflow"] == mlflow.__version__
        assert c.info.run_name.startswith(("demo-smoke-", "kv-retrieval-")), c.info.run_name  # says what ran

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{summary['runs']['train_moe']}/mlflow_model")
    (text,) = model.predict({"prompt": ["The with statement"]}, params={"max_new_tokens": 8})
    assert isinstance(text, str) and len(text) >= 1
