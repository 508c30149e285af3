"""kv_precision.json: per-layer KV precision maps, written by the KVTuner report, read by serving and benchmarks.

    write_map(path, qc, budget=4.0)                    # one map (workers.kvtuner.results, per budget)
    write_budgets(path, {4.0: map_entry(qc, ...)})     # every budget in one file
    art = load("runs:/<run_id>/kv_precision.json")     # or a run id, a local path or directory
    m = art.select(budget=4.0)                         # PrecisionMap; m.config() -> KVQuantConfig

Layout (version 1), one map:
    {"version": 1, "method": "kvtuner", "mode": "kivi" | "per_token", "group_size": G, "residual": R,
     "layers": [{"layer": 0, "k_bits": 8, "v_bits": 4}, ...], "equivalent_bits": float, "mixed": bool,
     ...extra fields (budget, stored_bits, calib_kl, heldout)...}
or every budget: {"version": 1, "method": "kvtuner", "maps": {str(budget): <one map, without "version">}}.

Also accepted on load (files from before the version field, and hand-written ones):
- no "version" key (read as version 1);
- "layers" entries as [k_bits, v_bits] pairs, or top-level "k_bits": [L] and "v_bits": [L];
- "group" for "group_size", "residual_window" for "residual"; missing mode / group / residual
  default to "kivi" / 32 / 32;
- "prefill" (the regime the map was searched in, workers.caches.precision.PREFILL_REGIMES) is
  provenance: a reader picks the regime it applies (`PrecisionMap.config(prefill=)`, default "full");
- bits 16 for a layer's keys or values: not quantized (the composed serving cache's identity setting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kernels.kv_quant import MODES
from workers.caches.precision import PREFILL_REGIMES, KVQuantConfig
from workers.runtime.artifacts import bad_field, check_version, pick, read_json

VERSION = 1
FILE_NAME = "kv_precision.json"
FILE_BITS = (2, 4, 8, 16)  # 16: not quantized


_bad = partial(bad_field, FILE_NAME)


def _bits(value, field: str) -> int:
    if isinstance(value, bool) or value not in FILE_BITS:
        raise _bad(field, value, f"one of {', '.join(map(str, FILE_BITS))}")
    return int(value)


@dataclass(frozen=True)
class PrecisionMap:
    """One map: key and value bits per layer [L] (16 = not quantized) and the quantizer settings."""

    k_bits: tuple[int, ...]
    v_bits: tuple[int, ...]
    mode: str = "kivi"
    group: int = 32
    residual: int = 32

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> PrecisionMap:
        """One map in any accepted shape; `where` prefixes field names (e.g. "maps['4.0'].")."""
        if "layers" in d:
            layers = d["layers"]
            if not isinstance(layers, list) or not layers:
                raise _bad(f"{where}layers", layers, "must be a non-empty list, one entry per layer")
            if all(isinstance(x, dict) and isinstance(x.get("layer"), int) for x in layers):
                order = sorted(range(len(layers)), key=lambda i: layers[i]["layer"])
                if [layers[i]["layer"] for i in order] != list(range(len(layers))):
                    raise _bad(f"{where}layers[].layer", [x["layer"] for x in layers], "must number 0..L-1 once each")
            else:
                order = range(len(layers))
            k_bits, v_bits = [], []
            for i in order:
                x, f = layers[i], f"{where}layers[{i}]"
                if isinstance(x, dict) and "k_bits" in x and "v_bits" in x:
                    k_bits.append(_bits(x["k_bits"], f"{f}.k_bits"))
                    v_bits.append(_bits(x["v_bits"], f"{f}.v_bits"))
                elif isinstance(x, list | tuple) and len(x) == 2:
                    k_bits.append(_bits(x[0], f"{f}[0]"))
                    v_bits.append(_bits(x[1], f"{f}[1]"))
                else:
                    raise _bad(f, x, 'must be {"k_bits", "v_bits"} or a [k_bits, v_bits] pair')
        elif "k_bits" in d or "v_bits" in d:
            ks, vs = d.get("k_bits"), d.get("v_bits")
            for name, bits in (("k_bits", ks), ("v_bits", vs)):
                if not isinstance(bits, list) or not bits:
                    raise _bad(f"{where}{name}", bits, "must be a non-empty list, one entry per layer")
            if len(ks) != len(vs):
                raise _bad(f"{where}v_bits", vs, f"has {len(vs)} entries, k_bits has {len(ks)}")
            k_bits = [_bits(b, f"{where}k_bits[{i}]") for i, b in enumerate(ks)]
            v_bits = [_bits(b, f"{where}v_bits[{i}]") for i, b in enumerate(vs)]
        else:
            what = where.removesuffix(".") or "the file"
            raise ValueError(f"{FILE_NAME}: {what} holds no 'layers' (nor 'k_bits'/'v_bits', nor 'maps')")
        mode = d.get("mode", "kivi")
        if mode not in MODES:
            raise _bad(f"{where}mode", mode, f"one of {MODES}")
        group_key = "group_size" if "group_size" in d else "group"
        group = d.get(group_key, 32)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise _bad(f"{where}{group_key}", group, "must be an int >= 1")
        residual_key = "residual" if "residual" in d else "residual_window"
        residual = d.get(residual_key, 32)
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
            raise _bad(f"{where}{residual_key}", residual, "must be an int >= 0")
        if d.get("prefill", "full") not in PREFILL_REGIMES:
            raise _bad(f"{where}prefill", d["prefill"], f"one of {', '.join(PREFILL_REGIMES)}")
        return cls(tuple(k_bits), tuple(v_bits), mode, group, residual)

    @property
    def n_layers(self) -> int:
        return len(self.k_bits)

    def check_layers(self, n_layers: int) -> PrecisionMap:
        if self.n_layers != n_layers:
            raise ValueError(f"{FILE_NAME}: a {self.n_layers}-layer map for a {n_layers}-layer model")
        return self

    def config(self, prefill: str = "full") -> KVQuantConfig:
        """The map as the caches' KVQuantConfig (which has no 16-bit setting: raises on one)."""
        pairs = tuple(f"K{k}V{v}" for k, v in zip(self.k_bits, self.v_bits))
        return KVQuantConfig(pairs, mode=self.mode, group=self.group, residual=self.residual, prefill=prefill)


@dataclass(frozen=True)
class KVPrecisionArtifact:
    """maps: {str(budget): PrecisionMap} for an every-budget file; single: a one-map file's map."""

    maps: dict[str, PrecisionMap] | None = None
    single: PrecisionMap | None = None

    @classmethod
    def from_dict(cls, d: dict) -> KVPrecisionArtifact:
        """Validate a parsed file (any accepted shape); errors name the field and its value."""
        check_version(d, FILE_NAME, VERSION)
        if "layers" in d or "k_bits" in d or "v_bits" in d or not isinstance(d.get("maps"), dict):
            return cls(single=PrecisionMap.from_dict(d))
        if not d["maps"]:
            raise _bad("maps", d["maps"], "holds no map")
        maps = {}
        for key, entry in d["maps"].items():
            try:
                float(key)
            except ValueError:
                raise _bad("maps key", key, "must be a budget number (equivalent bits)") from None
            if not isinstance(entry, dict):
                raise _bad(f"maps[{key!r}]", entry, "must be a map object")
            maps[key] = PrecisionMap.from_dict(entry, f"maps[{key!r}].")
        return cls(maps=maps)

    def select(self, budget: float | None) -> PrecisionMap:
        """The map for `budget` from an every-budget file (needed when it holds several); a
        one-map file's map whatever the budget."""
        if self.single is not None:
            return self.single
        try:
            return pick(self.maps, budget, "budget")
        except ValueError as e:
            raise ValueError(f"{FILE_NAME}: {e}") from None


def map_entry(qc: KVQuantConfig, **extra) -> dict:
    """One map in the file's layout (without "version"); `extra` adds fields such as budget."""
    return {
        "method": "kvtuner",
        "mode": qc.mode,
        "group_size": qc.group,
        "residual": qc.residual,
        "prefill": qc.prefill,  # the regime the map was searched and reported in
        "layers": [{"layer": i, "k_bits": p.k, "v_bits": p.v} for i, p in enumerate(qc.layers)],
        "equivalent_bits": qc.nominal_bits,
        "mixed": len(set(qc.layers)) > 1,
        **extra,
    }


def _write(path: str | Path, doc: dict, indent: int) -> Path:
    KVPrecisionArtifact.from_dict(doc)  # validate before writing
    path = Path(path)
    path.write_text(json.dumps(doc, indent=indent))
    return path


def write_map(path: str | Path, qc: KVQuantConfig, **extra) -> Path:
    """A one-map file at `path`."""
    return _write(path, {"version": VERSION, **map_entry(qc, **extra)}, indent=2)


def write_budgets(path: str | Path, maps: dict[float, dict]) -> Path:
    """An every-budget file at `path`: maps {budget: map_entry(...)}, keyed by str(budget)
    (serving picks one with kv_budget=)."""
    doc = {"version": VERSION, "method": "kvtuner", "maps": {str(b): m for b, m in maps.items()}}
    return _write(path, doc, indent=1)


def load(address: str | Path) -> KVPrecisionArtifact:
    """A local kv_precision.json (or its directory), a run id, or runs:/<run_id>/kv_precision.json."""
    return KVPrecisionArtifact.from_dict(read_json(address, FILE_NAME))


def load_config(address: str | Path, budget: float | None = None) -> KVQuantConfig:
    """The KVQuantConfig of one map (the one for `budget` in an every-budget file)."""
    return load(address).select(budget).config()
