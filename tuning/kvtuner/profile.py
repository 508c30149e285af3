"""KVTuner sensitivity profile: per (layer, pair) damage, and its per-layer Pareto-pruned candidates.

Shape legend: N layers, P = 9 pairs (K and V bits in {2, 4, 8}).

A `Profile` holds, per (layer, pair), the damage of quantizing only that layer with that pair
(KL of next-token distributions against full precision) and its NLL, both [N, P];
`workers.kvtuner.actors.run_profile` measures it on Ray actors and `assemble`s the rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuning.kvtuner.space import PAIRS, Pair, pareto_prune, parse_pair


@dataclass
class Profile:
    """damage, nll: [N, P] with columns in `PAIRS` order; exact: [N, P] exact-match rate."""

    damage: np.ndarray
    nll: np.ndarray
    exact: np.ndarray

    @property
    def n_layers(self) -> int:
        return self.damage.shape[0]

    def value(self, layer: int, pair: Pair | str) -> float:
        return float(self.damage[layer, PAIRS.index(parse_pair(pair))])

    def layer_candidates(self) -> list[list[Pair]]:
        """Per-layer Pareto-pruned pairs, by falling bits."""
        return [pareto_prune({p: float(self.damage[i, j]) for j, p in enumerate(PAIRS)}) for i in range(self.n_layers)]

    def keys_vs_values(self) -> dict:
        """Per layer: damage of 2-bit keys (V8) against 2-bit values (K8), and the same at 4 bits."""
        out = {}
        for bits in (2, 4):
            k = np.array([self.value(i, Pair(bits, 8)) for i in range(self.n_layers)])
            v = np.array([self.value(i, Pair(8, bits)) for i in range(self.n_layers)])
            out[f"keys_more_sensitive_{bits}bit"] = int((k > v).sum())
            out[f"key_damage_{bits}bit"] = k.tolist()
            out[f"value_damage_{bits}bit"] = v.tolist()
        out["n_layers"] = self.n_layers
        k2 = np.array(out["key_damage_2bit"])
        out["k2_layer_spread"] = float(k2.max() / max(k2.min(), 1e-12))
        return out

    def to_dict(self) -> dict:
        return {
            "pairs": [p.name for p in PAIRS],
            "damage": self.damage.tolist(),
            "nll": self.nll.tolist(),
            "exact": self.exact.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if d.get("pairs") != [p.name for p in PAIRS]:
            raise ValueError("profile file was written with a different pair order")
        return cls(np.array(d["damage"]), np.array(d["nll"]), np.array(d["exact"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def assemble(rows: list[dict], n_layers: int) -> Profile:
    """Rows {"layer", "pair", "damage", "nll", "exact"} -> Profile; every (layer, pair) exactly once."""
    shape = (n_layers, len(PAIRS))
    arrs = {k: np.full(shape, np.nan) for k in ("damage", "nll", "exact")}
    for r in rows:
        j = PAIRS.index(parse_pair(r["pair"]))
        for k in arrs:
            arrs[k][r["layer"], j] = r[k]
    if np.isnan(arrs["damage"]).any():
        raise RuntimeError("profile is missing (layer, pair) entries")
    return Profile(**arrs)
