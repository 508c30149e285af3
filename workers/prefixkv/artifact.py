"""prefixkv.json: the calibrated configuration, written by pipelines.prefixkv, read by eval and serve.

    cal = load_calibration("runs:/<run_id>/prefixkv.json")     # or a local path
    cache = cal.cache(ratio=0.2)                               # an EvictingCache for one request

Layout (version 1):
    {"version": 1, "model": str, "n_layers": L, "n_sink": int, "context": N, "samples": S,
     "ratios": [R floats], "default_score": "sum" | "window", "window": int,
     "scores": {mode: {"fractions": [R][L], "bootstrap_se": [R][L], "sample_sd": [R][L]}}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.caches.evicting import EvictingCache
from workers.caches.scoring import ScoreConfig

VERSION = 1
FILE_NAME = "prefixkv.json"


@dataclass(frozen=True)
class Calibration:
    data: dict

    def __post_init__(self):
        d = self.data
        if d.get("version") != VERSION:
            raise ValueError(f"prefixkv.json version {d.get('version')!r} is not {VERSION}")
        for key in ("n_layers", "n_sink", "ratios", "scores", "default_score", "window"):
            if key not in d:
                raise ValueError(f"prefixkv.json is missing {key!r}")
        for mode, entry in d["scores"].items():
            fr = np.asarray(entry["fractions"], dtype=np.float64)
            if fr.shape != (len(d["ratios"]), d["n_layers"]):
                raise ValueError(f"prefixkv.json scores[{mode!r}].fractions has shape {fr.shape}")

    @property
    def n_layers(self) -> int:
        return int(self.data["n_layers"])

    @property
    def n_sink(self) -> int:
        return int(self.data["n_sink"])

    def score(self, mode: str | None = None) -> ScoreConfig:
        mode = mode or self.data["default_score"]
        return ScoreConfig(mode, window=int(self.data["window"]), pool=int(self.data.get("pool", 1)))

    def fractions(self, mode: str | None = None) -> dict[float, list[float]]:
        """{ratio: [L] fractions} for a score mode (the default one if None)."""
        mode = mode or self.data["default_score"]
        if mode not in self.data["scores"]:
            raise ValueError(f"prefixkv.json has no calibration for score {mode!r}: {sorted(self.data['scores'])}")
        fr = self.data["scores"][mode]["fractions"]
        return {float(r): list(f) for r, f in zip(self.data["ratios"], fr)}

    def cache(self, ratio: float, mode: str | None = None) -> EvictingCache:
        """A fresh evicting cache at `ratio` (grid points exact, others interpolated)."""
        from tuning.prefixkv.plan import schedule_fractions

        f = schedule_fractions("prefixkv", ratio, self.n_layers, self.fractions(mode))
        return EvictingCache(self.n_layers, f, ratio, n_sink=self.n_sink, score=self.score(mode))


def save_calibration(data: dict, path: str | Path) -> Path:
    Calibration(data)  # validate before writing
    p = Path(path)
    p.write_text(json.dumps(data, indent=1))
    return p


def load_calibration(address: str | Path) -> Calibration:
    """A local prefixkv.json, or an MLflow artifact URI such as runs:/<run_id>/prefixkv.json."""
    address = str(address)
    if address.startswith(("runs:/", "mlflow-artifacts:")):
        import mlflow

        from workers.runtime.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            address = mlflow.artifacts.download_artifacts(artifact_uri=address)
        except Exception as e:  # mlflow raises several types for a missing run or artifact
            raise FileNotFoundError(f"calibration={address!r}: cannot download from MLflow ({e})") from e
    p = Path(address)
    if p.is_dir():
        p = p / FILE_NAME
    if not p.is_file():
        raise FileNotFoundError(f"calibration={str(address)!r}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration={str(address)!r}: not JSON ({e})") from e
    return Calibration(data)
