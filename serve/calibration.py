"""Resolve the calibrated configs a deployment applies, before any replica starts.

Each config is optional and given as a JSON path, an MLflow run id (the run's artifact of the
method's standard name is fetched), or ``runs:/<run_id>/<file>.json``. The builder resolves and
validates them on the driver, so a bad id or file fails `serve run` with a message naming the
argument; replicas receive the parsed result (plain JSON-able dicts) and never touch MLflow for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve.config import ServeArgs

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ARTIFACT_NAMES = {
    "indexcache": "indexcache.json",
    "kv_precision": "kv_precision.json",
    "prefixkv": "prefixkv.json",
}


class CalibrationError(ValueError):
    """A calibrated config cannot be found or does not fit the model; names the argument."""


@dataclass
class Calibration:
    """What a replica applies. pattern: F/S string; kv: per-layer precision; evict: per-layer keep."""

    pattern: str | None = None
    kv: dict | None = None  # {"k_bits": [L], "v_bits": [L], "mode", "group", "residual"}
    evict: dict | None = None  # {"fractions": [L], "keep_ratio", "n_sink"}
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**d)

    def describe(self) -> dict[str, str]:
        out = dict(self.sources)
        if self.pattern:
            out["pattern"] = self.pattern
        if self.evict:
            out["keep_ratio"] = str(self.evict["keep_ratio"])
        if self.kv:
            out["kv_bits"] = " ".join(f"K{k}V{v}" for k, v in zip(self.kv["k_bits"], self.kv["v_bits"]))
        return out


def load_json(arg: str, value: str) -> dict:
    """JSON path | run id | runs:/<id>/<file> -> parsed dict. `arg` names the argument in errors."""
    if RUN_ID.match(value) or value.startswith("runs:/"):
        import mlflow

        from workers.runtime.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        uri = f"runs:/{value}/{ARTIFACT_NAMES[arg]}" if RUN_ID.match(value) else value
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except Exception as e:  # MLflow raises several types for missing runs/artifacts
            raise CalibrationError(f"{arg}={value!r}: cannot fetch {uri} from MLflow ({e})") from e
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise CalibrationError(f"{arg}={value!r}: no such file (expected a JSON path or a run id)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{arg}={value!r}: not valid JSON ({e})") from e


def _pick(arg: str, table: dict, key: float | None, key_name: str):
    """Choose the entry of {str(number): entry} closest to `key` (required when several exist)."""
    if len(table) == 1 and key is None:
        return next(iter(table.values()))
    if key is None:
        raise CalibrationError(f"{arg}: holds entries for {sorted(table)}; pass {key_name}= to choose one")
    best = min(table, key=lambda k: abs(float(k) - key))
    if abs(float(best) - key) > 1e-6:
        raise CalibrationError(f"{key_name}={key!r}: {arg} has entries only for {sorted(table)}")
    return table[best]


def parse_indexcache(d: dict, retention: float | None, n_layers: int) -> str:
    """indexcache.json (pipelines.indexcache: {"patterns": {"<retention>": {"searched": {"pattern"}}}})
    or a bare {"pattern": "FSFS..."} -> the F/S pattern to serve."""
    if isinstance(d.get("patterns"), dict) and (retention is not None or "pattern" not in d):
        entry = _pick("indexcache", d["patterns"], retention, "retention")
        if isinstance(entry, dict):
            entry = entry.get("searched", entry)
            entry = entry.get("pattern") if isinstance(entry, dict) else entry
        pattern = entry
    elif isinstance(d.get("pattern"), str):
        pattern = d["pattern"]
    else:
        raise CalibrationError("indexcache: JSON has neither 'pattern' nor 'patterns'")
    if not isinstance(pattern, str):
        raise CalibrationError(f"indexcache: no pattern string found (got {pattern!r})")
    return check_pattern(pattern, n_layers)


def check_pattern(pattern: str, n_layers: int) -> str:
    if len(pattern) != n_layers or set(pattern) - {"F", "S"} or not pattern.startswith("F"):
        raise CalibrationError(
            f"pattern={pattern!r}: needs {n_layers} characters of F/S starting with F (the model's layers)"
        )
    return pattern


def parse_kv_precision(d: dict, budget: float | None, n_layers: int) -> dict:
    if "layers" not in d and isinstance(d.get("maps"), dict):
        d = {**d, **_pick("kv_precision", d["maps"], budget, "kv_budget")}
    layers = d.get("layers")
    if layers is not None:
        k_bits = [int(x["k_bits"]) if isinstance(x, dict) else int(x[0]) for x in layers]
        v_bits = [int(x["v_bits"]) if isinstance(x, dict) else int(x[1]) for x in layers]
    else:
        k_bits, v_bits = list(map(int, d.get("k_bits", []))), list(map(int, d.get("v_bits", [])))
    if len(k_bits) != n_layers or len(v_bits) != n_layers:
        raise CalibrationError(
            f"kv_precision: {len(k_bits)} key / {len(v_bits)} value bit entries for a {n_layers}-layer model"
        )
    for b in k_bits + v_bits:
        if b not in (2, 4, 8, 16):
            raise CalibrationError(f"kv_precision: bits={b!r}; each must be one of 2, 4, 8, 16")
    return {
        "k_bits": k_bits,
        "v_bits": v_bits,
        "mode": str(d.get("mode", "kivi")),
        "group": int(d.get("group", d.get("group_size", 32))),
        "residual": int(d.get("residual", d.get("residual_window", 32))),
    }


def parse_prefixkv(d: dict, keep_ratio: float, n_layers: int, score: str | None = None) -> dict:
    """prefixkv.json (workers.prefixkv.artifact, version 1) -> per-layer fractions at keep_ratio.

    Ratios on the calibrated grid are used as stored; others are interpolated by the PrefixKV
    helper's schedule (tuning.prefixkv_plan.schedule_fractions)."""
    from tuning.prefixkv.plan import schedule_fractions
    from workers.prefixkv.artifact import Calibration as PrefixKVCalibration

    try:
        pkv = PrefixKVCalibration(d)
        if pkv.n_layers != n_layers:
            raise ValueError(f"calibrated for {pkv.n_layers} layers, the model has {n_layers}")
        fractions = schedule_fractions("prefixkv", keep_ratio, n_layers, pkv.fractions(score))
        sc = pkv.score(score)
    except ValueError as e:
        raise CalibrationError(f"prefixkv: {e}") from e
    return {
        "fractions": [float(f) for f in fractions],
        "keep_ratio": keep_ratio,
        "n_sink": pkv.n_sink,
        "score": sc.mode,
        "window": sc.window,
        "pool": sc.pool,
    }


def resolve(args: ServeArgs, n_layers: int) -> Calibration:
    """Fetch and validate every config given in args against a model with n_layers layers."""
    cal = Calibration()
    if args.indexcache is not None:
        cal.pattern = parse_indexcache(load_json("indexcache", args.indexcache), args.retention, n_layers)
        cal.sources["indexcache"] = args.indexcache
    if args.pattern is not None:
        cal.pattern = check_pattern(args.pattern, n_layers)
    if args.kv_precision is not None:
        cal.kv = parse_kv_precision(load_json("kv_precision", args.kv_precision), args.kv_budget, n_layers)
        cal.sources["kv_precision"] = args.kv_precision
    if args.prefixkv is not None:
        cal.evict = parse_prefixkv(load_json("prefixkv", args.prefixkv), args.keep_ratio, n_layers)
        cal.sources["prefixkv"] = args.prefixkv
    return cal
