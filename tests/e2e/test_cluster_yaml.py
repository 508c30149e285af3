"""cluster.yaml passes the Ray autoscaler's own schema validation and names real entry points."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _config()
    validate_config(prepare_config(copy.deepcopy(cfg)))  # raises on any schema violation
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("gpu" in name for name in cfg["available_node_types"])


def test_cluster_commands_name_real_entry_points_and_keep_servers_private():
    text = (ROOT / "cluster.yaml").read_text()
    modules = set(re.findall(r"python -m (pipelines\.\w+)", text))
    assert modules, "cluster.yaml documents no pipeline"
    for mod in modules:
        assert importlib.util.find_spec(mod) is not None, mod
    cfg = _config()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "mlflow server" in head and "--host 0.0.0.0" not in head and "--backend-store-uri sqlite:" in head
    assert "RAY_AUTH_MODE=token" in head
    assert any("pip install" in c and "-e" in c for c in cfg["setup_commands"])
    for path in re.findall(r"serve deploy ([\w/.-]+)", text):
        assert (ROOT / path).exists(), path
