"""Resolve the calibrated configs a deployment applies, before any replica starts.

Each config is optional and given as a JSON path, an MLflow run id (the run's artifact of the
method's standard name is fetched), or ``runs:/<run_id>/<file>.json``. Each method's artifact
module (workers.<method>.artifact) fetches, validates and chooses the entry (by retention,
kv_budget or keep_ratio); this module only dispatches to them on the driver, so a bad id or file
fails `serve run` with a message naming the argument. Replicas receive the result (plain JSON-able
dicts) and never touch MLflow for it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from serve.config import ServeArgs
from tuning.indexcache.patterns import validate_pattern
from workers.indexcache import artifact as indexcache
from workers.kvtuner import artifact as kvtuner
from workers.prefixkv import artifact as prefixkv


class CalibrationError(ValueError):
    """A calibrated config cannot be found or does not fit the model; names the argument."""


@dataclass
class Calibration:
    """What a replica applies. pattern: F/S string; kv: per-layer precision; evict: per-layer keep."""

    pattern: str | None = None
    kv: dict | None = None  # {"k_bits": [L], "v_bits": [L], "mode", "group", "residual", "prefill"}
    evict: dict | None = None  # {"fractions": [L], "keep_ratio", "n_sink", "score", "window", "pool"}
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
            out["kv_prefill"] = self.kv.get("prefill", "full")
        return out


@contextmanager
def _naming(*names: str, **args):
    """Raise a fetch, validation or fit error as a CalibrationError naming the serve arguments involved
    (`names` bare: the artifact loaders' errors already quote the address; `args` with their values)."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        prefix = ", ".join([*names, *(f"{k}={v!r}" for k, v in args.items())])
        raise CalibrationError(f"{prefix}: {e}" if prefix else str(e)) from e


def resolve(args: ServeArgs, n_layers: int) -> Calibration:
    """Fetch and validate every config given in args against a model with n_layers layers."""
    cal = Calibration()
    if args.indexcache is not None:
        with _naming("indexcache"):
            ic = indexcache.load(args.indexcache)
        with _naming(indexcache=args.indexcache, retention=args.retention):
            cal.pattern = ic.select(args.retention, n_layers)
        cal.sources["indexcache"] = args.indexcache
    if args.pattern is not None:
        with _naming():  # the rule's message starts "pattern=<value>"
            cal.pattern = validate_pattern(args.pattern, n_layers)
    if args.kv_precision is not None:
        with _naming("kv_precision"):
            kv = kvtuner.load(args.kv_precision)
        with _naming(kv_precision=args.kv_precision, kv_budget=args.kv_budget):
            m = kv.select(args.kv_budget).check_layers(n_layers)
        cal.kv = {
            "k_bits": list(m.k_bits),
            "v_bits": list(m.v_bits),
            "mode": m.mode,
            "group": m.group,
            "residual": m.residual,
            "prefill": args.kv_prefill,  # the regime served; the file's "prefill" records the search's
        }
        cal.sources["kv_precision"] = args.kv_precision
    if args.prefixkv is not None:
        with _naming("prefixkv"):
            pkv = prefixkv.load(args.prefixkv)
        with _naming(prefixkv=args.prefixkv, keep_ratio=args.keep_ratio):
            fractions = pkv.check_layers(n_layers).layer_fractions(args.keep_ratio)
        sc = pkv.score()
        cal.evict = {
            "fractions": [float(f) for f in fractions],
            "keep_ratio": args.keep_ratio,
            "n_sink": pkv.n_sink,
            "score": sc.mode,
            "window": sc.window,
            "pool": sc.pool,
        }
        cal.sources["prefixkv"] = args.prefixkv
    return cal
