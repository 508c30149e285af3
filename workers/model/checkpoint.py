"""Checkpoints: a directory with config.json + model.safetensors.

A model is addressed by ``runs:/<run_id>/model`` (an MLflow artifact) or a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from workers.model.config import ModelConfig
from workers.model.transformer import CalibLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(FileNotFoundError):
    """A model address does not resolve to a readable checkpoint."""


def save(model: CalibLM, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` (created). Buffers (router state) are saved too."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).write_text(model.cfg.to_json())
    save_model(model, str(d / WEIGHTS_FILE), metadata={"calibray": json.dumps(meta or {})})
    return d


def locate(address: str | Path) -> Path:
    """``runs:/<id>/<path>`` (downloaded from MLflow) or a local path -> local path; nothing is checked."""
    address = str(address)
    if address.startswith(("runs:/", "models:/")):
        from workers.runtime.tracking import download

        try:
            return download(address)
        except Exception as e:  # mlflow raises several types for a missing run or artifact
            raise CheckpointError(f"model={address!r}: cannot download from MLflow ({e})") from e
    return Path(address).expanduser()


def resolve(address: str | Path) -> Path:
    """``runs:/<id>/model`` or a directory -> local directory holding the checkpoint."""
    address = str(address)
    if address.startswith("hf:"):
        raise CheckpointError(f"model={address!r}: hf: models load through workers.model.hf.address, not CalibLM")
    path = locate(address)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"model={address!r}: missing {name} in {path}")
    return path


def _config(address: str | Path, path: Path) -> ModelConfig:
    try:
        d = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"model={str(address)!r}: {path / CONFIG_FILE} is not a JSON config ({e})") from None
    if "model_type" in d:  # every transformers config has one, a CalibLM config never does
        raise CheckpointError(
            f"model={str(address)!r}: a Hugging Face checkpoint, not a CalibLM; load it with "
            "workers.model.hf.address.load_any"
        )
    return ModelConfig.from_dict(d)


def load_config(address: str | Path) -> ModelConfig:
    return _config(address, resolve(address))


def load(address: str | Path, device: str | torch.device = "cpu") -> CalibLM:
    """Load a CalibLM in eval mode from an address (see module docstring)."""
    path = resolve(address)
    model = CalibLM(_config(address, path))
    load_model(model, str(path / WEIGHTS_FILE), device=str(device))
    return model.to(device).eval()
