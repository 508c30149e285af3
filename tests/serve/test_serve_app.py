"""The typed builder and the deploy config: what `serve run serve.app:build k=v` and
`serve deploy configs/serve.yaml` go through, including errors that name the bad argument."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema
from serve_util import free_port

from serve.app import DeployError, build, deploy
from serve.calibration import CalibrationError
from serve.config import ServeArgs
from tests import procs
from workers.model.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "serve.yaml"


def test_deploy_config_is_a_valid_serve_config_with_valid_args():
    doc = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build"
    assert doc["http_options"]["host"] == "127.0.0.1"
    args = ServeArgs.model_validate(app.args)
    assert args.autoscaling_config["max_replicas"] == 4


def test_cli_style_string_args_build_an_application(tiny_checkpoint, calib_files):
    # `serve run serve.app:build model=... keep_ratio=0.5` passes every value as a string.
    args = {
        "model": str(tiny_checkpoint),
        "max_batch_size": "4",
        "kv_precision": calib_files["kv_precision"],
        "prefixkv": calib_files["prefixkv"],
        "keep_ratio": "0.5",
        "indexcache": calib_files["indexcache"],
        "retention": "0.25",
    }
    app = call_user_app_builder_with_args_if_necessary(build, args)
    assert isinstance(app, Application)


@pytest.mark.parametrize(
    "change,exc,name",
    [
        ({"model": "/no/such/checkpoint"}, CheckpointError, "model"),
        ({"max_batch_size": "0"}, ValidationError, "max_batch_size"),
        ({"prefixkv": "PKV"}, ValidationError, "keep_ratio"),
        ({"keep_ratio": "0.5"}, ValidationError, "prefixkv"),
        ({"num_replicas": "2", "autoscaling_config": {"max_replicas": 2}}, ValidationError, "num_replicas"),
        ({"bogus": "1"}, ValidationError, "bogus"),
        ({"kv_precision": "/no/such.json"}, CalibrationError, "kv_precision"),
        ({"kv_precision": "BADKV"}, CalibrationError, "kv_precision"),
        ({"indexcache": "IC", "retention": "0.125"}, CalibrationError, "retention"),
        ({"pattern": "SFFF"}, CalibrationError, "pattern"),
    ],
)
def test_bad_arguments_fail_naming_the_argument(tiny_checkpoint, calib_files, tmp_path, change, exc, name):
    bad_kv = tmp_path / "kv.json"
    bad_kv.write_text(json.dumps({"mode": "kivi", "layers": [{"layer": 0, "k_bits": 4, "v_bits": 4}]}))
    subst = {"PKV": calib_files["prefixkv"], "IC": calib_files["indexcache"], "BADKV": str(bad_kv)}
    args = {
        "model": str(tiny_checkpoint),
        **{k: subst.get(v, v) if isinstance(v, str) else v for k, v in change.items()},
    }
    with pytest.raises(exc, match=name):
        call_user_app_builder_with_args_if_necessary(build, args)


def test_indexcache_on_a_model_without_indexer_is_refused(tiny_dense_checkpoint, calib_files):
    args = {"model": str(tiny_dense_checkpoint), "indexcache": calib_files["indexcache"], "retention": "0.5"}
    with pytest.raises(CalibrationError, match="indexer"):
        call_user_app_builder_with_args_if_necessary(build, args)


# -- python -m serve.app --config: the deploy file, run locally with its host and port ---------------


def _config(path: Path, model: str, port: int | None = None) -> Path:
    doc = {"applications": [{"name": "one", "route_prefix": "/", "import_path": "serve.app:build"}]}
    doc["applications"][0]["args"] = {"model": model, "name": "tiny", **SMALL_ARGS}
    if port is not None:
        doc["http_options"] = {"host": "127.0.0.1", "port": port}
    path.write_text(yaml.safe_dump(doc))
    return path


SMALL_ARGS = {"replica_cpus": 0.25, "ingress_cpus": 0.05, "torch_threads": 1, "max_tokens_limit": 16}


def _serve_app(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, "-m", "serve.app", *argv], check=False, timeout=timeout, cwd=ROOT)


def test_config_with_a_bad_application_exits_2_naming_it(tmp_path):
    cfg = _config(tmp_path / "serve.yaml", "/no/such/checkpoint")
    r = _serve_app("--config", str(cfg))
    assert r.returncode == 2, procs.output(r)
    (line,) = r.stderr.strip().splitlines()
    assert "application 'one'" in line and "/no/such/checkpoint" in line and str(cfg) in line
    r = _serve_app("--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr and "Traceback" not in r.stderr, procs.output(r)


def test_config_runs_on_the_port_given_on_the_command_line(tmp_path, tiny_checkpoint):
    port = free_port()
    cfg = _config(tmp_path / "serve.yaml", str(tiny_checkpoint), port=free_port())  # the flag wins
    stderr = (tmp_path / "serve-app.stderr").open("w")  # printed below: a failing test shows why
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.app", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        # The process says where it serves once every application is running.
        deadline, line = time.monotonic() + 180, ""
        while "serving" not in line:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in line
        body = {"model": "tiny", "prompt": "The ", "max_tokens": 4}
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        stderr.close()
        print((tmp_path / "serve-app.stderr").read_text(errors="replace")[-procs.TAIL :])
    assert proc.returncode == 0


def test_an_application_that_fails_to_start_is_a_deploy_error(ray_local, serve_urls, tiny_checkpoint, tmp_path):
    # Built on the driver (config and tokenizer are fine), then every replica fails loading the weights.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    app = build(ServeArgs(model=str(broken), name="broken", **SMALL_ARGS))
    try:
        with pytest.raises(DeployError, match="'broken' failed to deploy"):
            deploy({"host": "127.0.0.1", "port": 8000}, [("broken", "/broken", app)])
    finally:
        serve.delete("broken")  # its replicas would keep restarting, holding the session's CPUs
    serve.delete("broken")
