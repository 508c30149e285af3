"""The typed builder and the deploy config: what `serve run serve.app:build k=v` and
`serve deploy configs/serve.yaml` go through, including errors that name the bad argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from serve.app import build
from serve.calibration import CalibrationError
from serve.config import ServeArgs
from workers.model.checkpoint import CheckpointError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "serve.yaml"


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
