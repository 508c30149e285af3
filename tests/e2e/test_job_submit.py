"""A real `ray start --head` on loopback, a real `mlflow server`, and `ray job submit --working-dir .`.

The head gets its own --temp-dir (no other test attaches to it) and is stopped by killing
exactly the processes of that session, never with a machine-wide `ray stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests import procs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _kill_matching(pattern: str) -> None:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    for pid in out:
        if int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def head_and_mlflow(tmp_path):
    temp_dir = Path("/tmp") / f"crh{os.getpid()}"  # short: Ray's socket paths have a length limit
    gcs, dash, mlf, agent = _free_port(), _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # the job's `python` is this environment's interpreter
    mlflow_cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlf),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    with procs.background(mlflow_cmd, tmp_path / "mlflow-server.log", env=env, start_new_session=True) as mlflow_proc:
        # check=False here: a failed start must still reach the cleanup below (a half-started head)
        head = procs.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             # the agent's default port (52365) is taken by any other Ray on the machine (the session's own)
             f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--disable-usage-stats"],
            check=False, env=env, timeout=180,
        )  # fmt: skip
        try:
            assert head.returncode == 0, procs.output(head)
            # the server alone took 46 s to answer on 2 loaded cores; 120 s timed out under the full suite
            _wait_http(f"http://127.0.0.1:{mlf}/health", 300)
            _wait_http(f"http://127.0.0.1:{dash}/api/version", 300)
            yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{mlf}"}
        finally:
            _kill_matching(str(temp_dir))
            os.killpg(mlflow_proc.pid, signal.SIGKILL)


def test_ray_job_submit_runs_a_pipeline_that_logs_to_the_mlflow_server(head_and_mlflow):
    h = head_and_mlflow
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": h["mlflow"], "RAY_DEDUP_LOGS": "0"}}
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", h["dashboard"], "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "pipelines.train_moe", "--preset", "tiny", "--steps", "4", "--cpus-per-worker", "0.5",
        "--experiment", "job-submit",
    ]  # fmt: skip
    deadline = time.time() + 180
    while True:  # the head's job agent comes up a little after the dashboard answers
        done = procs.run(cmd, check=False, cwd=ROOT, env=h["env"], timeout=900)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, procs.output(done)
    assert "succeeded" in (done.stdout + done.stderr).lower(), procs.output(done)
    client = MlflowClient(h["mlflow"])
    exp = client.get_experiment_by_name("job-submit")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert "heldout_bpb" in run.data.metrics and "train_loss" in run.data.metrics
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} == {
        "model/config.json",
        "model/model.safetensors",
    }
