"""prefixkv.json: the calibrated per-layer budgets, written by pipelines.prefixkv, read by eval, benchmarks and serve.

    write(data, workdir / FILE_NAME)                       # pipelines.prefixkv, validated first
    art = load("runs:/<run_id>/prefixkv.json")             # or a run id, a local path or directory
    cache = art.cache(ratio=0.2)                           # an EvictingCache for one request

Layout (version 1):
    {"version": 1, "model": str, "n_layers": L, "n_sink": int, "context": N, "samples": S, "data": str,
     "ratios": [R floats], "default_score": "sum" | "window", "window": int, "pool": int,
     "scores": {mode: {"fractions": [R][L], "bootstrap_se": [R][L], "sample_sd": [R][L]}}}
Checked on load: version, n_layers, n_sink, ratios, default_score, window and each score's fractions;
"pool" may be missing (files from before it: 1); model, context, samples, data and the spreads are provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tuning.prefixkv.plan import schedule_fractions
from workers.caches.evicting import EvictingCache
from workers.caches.scoring import ScoreConfig
from workers.runtime.artifacts import bad_field, check_version, read_json

VERSION = 1
FILE_NAME = "prefixkv.json"
REQUIRED = ("n_layers", "n_sink", "ratios", "scores", "default_score", "window")


_bad = partial(bad_field, FILE_NAME)


@dataclass(frozen=True)
class PrefixKVArtifact:
    """A validated prefixkv.json (data: the parsed file, layout above)."""

    data: dict

    def __post_init__(self):
        d = self.data
        check_version(d, FILE_NAME, VERSION, required=True)
        for key in REQUIRED:
            if key not in d:
                raise ValueError(f"{FILE_NAME}: missing {key!r} (needs {', '.join(REQUIRED)})")
        for key, low in (("n_layers", 1), ("n_sink", 0), ("window", 1)):
            if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < low:
                raise _bad(key, d[key], f"must be an int >= {low}")
        if not isinstance(d["ratios"], list) or not d["ratios"]:
            raise _bad("ratios", d["ratios"], "must be a non-empty list of keep ratios")
        if not isinstance(d["scores"], dict) or not d["scores"]:
            raise _bad("scores", d["scores"], "must map a score mode to its fractions")
        if d["default_score"] not in d["scores"]:
            raise _bad("default_score", d["default_score"], f"must be one of the scores {sorted(d['scores'])}")
        for mode, entry in d["scores"].items():
            if not isinstance(entry, dict) or "fractions" not in entry:
                raise ValueError(f"{FILE_NAME}: scores[{mode!r}] has no 'fractions'")
            try:
                fr = np.asarray(entry["fractions"], dtype=np.float64)
            except (TypeError, ValueError):  # ragged or non-numeric lists
                fr = np.asarray([])
            if fr.shape != (len(d["ratios"]), d["n_layers"]):
                raise ValueError(
                    f"{FILE_NAME}: scores[{mode!r}].fractions has shape {fr.shape}, "
                    f"not (len(ratios), n_layers) = ({len(d['ratios'])}, {d['n_layers']})"
                )

    @property
    def n_layers(self) -> int:
        return int(self.data["n_layers"])

    @property
    def n_sink(self) -> int:
        return int(self.data["n_sink"])

    def check_layers(self, n_layers: int) -> PrefixKVArtifact:
        if self.n_layers != n_layers:
            raise ValueError(f"{FILE_NAME}: calibrated for {self.n_layers} layers, the model has {n_layers}")
        return self

    def score(self, mode: str | None = None) -> ScoreConfig:
        mode = mode or self.data["default_score"]
        return ScoreConfig(mode, window=int(self.data["window"]), pool=int(self.data.get("pool", 1)))

    def fractions(self, mode: str | None = None) -> dict[float, list[float]]:
        """{ratio: [L] fractions} for a score mode (the default one if None)."""
        mode = mode or self.data["default_score"]
        if mode not in self.data["scores"]:
            raise ValueError(f"{FILE_NAME}: no calibration for score {mode!r}: {sorted(self.data['scores'])}")
        fr = self.data["scores"][mode]["fractions"]
        return {float(r): list(f) for r, f in zip(self.data["ratios"], fr)}

    def layer_fractions(self, ratio: float, mode: str | None = None) -> np.ndarray:
        """[L] keep fractions at `ratio`: grid points as stored, others interpolated by the PrefixKV
        schedule (tuning.prefixkv.plan.schedule_fractions)."""
        return schedule_fractions("prefixkv", ratio, self.n_layers, self.fractions(mode))

    def cache(self, ratio: float, mode: str | None = None) -> EvictingCache:
        """A fresh evicting cache at `ratio`."""
        f = self.layer_fractions(ratio, mode)
        return EvictingCache(self.n_layers, f, ratio, n_sink=self.n_sink, score=self.score(mode))


def write(data: dict, path: str | Path) -> Path:
    PrefixKVArtifact(data)  # validate before writing
    p = Path(path)
    p.write_text(json.dumps(data, indent=1))
    return p


def load(address: str | Path) -> PrefixKVArtifact:
    """A local prefixkv.json (or its directory), a run id, or runs:/<run_id>/prefixkv.json."""
    return PrefixKVArtifact(read_json(address, FILE_NAME))
