"""`KVQuantConfig`: a per-layer (key bits, value bits) map plus quantizer settings, and its bit accounting.

Bits (spec/kvtuner.md):
- nominal equivalent bits = mean over layers of (k_bits + v_bits) / 2;
- stored bits per K/V element also count each group's fp32 scale and min and the
  full-precision window, for a given context length (`stored_bits(n_tokens, head_dim)`).

`kv_precision.json` (one per budget; the pipeline also writes all budgets in one file as
{"method": "kvtuner", "maps": {"4.0": <map>, ...}}, read with `from_json(path, budget=4.0)`):
    {"method": "kvtuner", "mode": "kivi", "group_size": 32, "residual": 32,
     "layers": [{"layer": 0, "k_bits": 8, "v_bits": 4}, ...],
     "equivalent_bits": 6.0, "budget": 6.0, ...extra fields...}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kernels.kv_quant import MODES, group_shape, words_per_vector
from tuning.kvtuner.space import Pair, equivalent_bits, parse_pair

SCALE_BYTES = 4  # kernels.kv_quant stores scale and min in fp32


@dataclass(frozen=True)
class KVQuantConfig:
    """Per-layer precision map [N] and the quantizer shared by the fake-quant and packed caches.

    mode: "kivi" (keys per channel over `group` tokens, values per token over `group` channels)
    or "per_token" (each token's head vector is one group). residual: the newest tokens kept in
    full precision (at least `residual`, fewer than residual + block, block = group in KIVI, 1 per token).
    """

    layers: tuple[Pair, ...]
    mode: str = "kivi"
    group: int = 32
    residual: int = 32
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("KVQuantConfig.layers must name a (k, v) pair for at least one layer")
        object.__setattr__(self, "layers", tuple(parse_pair(p) for p in self.layers))
        if self.mode not in MODES:
            raise ValueError(f"KVQuantConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"KVQuantConfig.group must be an int >= 1, got {self.group!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"KVQuantConfig.residual must be an int >= 0, got {self.residual!r}")

    @classmethod
    def uniform(cls, pair: str | Pair, n_layers: int, **kw) -> KVQuantConfig:
        return cls(tuple([parse_pair(pair)] * n_layers), **kw)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def block(self) -> int:
        """Tokens quantized together: a KIVI key group, or one token in per-token mode."""
        return self.group if self.mode == "kivi" else 1

    @property
    def nominal_bits(self) -> float:
        return equivalent_bits(self.layers)

    def check_model(self, n_layers: int) -> None:
        """Clear error when the map does not fit the model, before any work starts."""
        if n_layers != self.n_layers:
            raise ValueError(f"precision map has {self.n_layers} layers, the model has {n_layers}")

    def layer_stored_bits(self, layer: int, n_tokens: int, head_dim: int, window_bits: int = 32) -> float:
        """Stored bits per K/V element of one layer holding n_tokens (codes + scales/mins + window)."""
        p = self.layers[layer]
        n_q = self.quantized_tokens(n_tokens)
        n_w = n_tokens - n_q
        total = 0.0
        for role, bits in (("k", p.k), ("v", p.v)):
            rt, rc = group_shape(self.mode, role, head_dim, self.group)
            code_bits = n_q * words_per_vector(head_dim, bits) * 32
            groups = (n_q // rt) * -(-head_dim // rc)
            total += code_bits + groups * 2 * SCALE_BYTES * 8 + n_w * head_dim * window_bits
        return total / (2 * n_tokens * head_dim)

    def stored_bits(self, n_tokens: int, head_dim: int, window_bits: int = 32) -> float:
        """Mean over layers of `layer_stored_bits` at a context of n_tokens."""
        return sum(self.layer_stored_bits(i, n_tokens, head_dim, window_bits) for i in range(self.n_layers)) / (
            self.n_layers
        )

    def quantized_tokens(self, n_tokens: int) -> int:
        """How many of n_tokens sit in quantized blocks (the rest in the window), after any update."""
        spill = max(0, n_tokens - self.residual)
        return (spill // self.block) * self.block

    def name(self) -> str:
        names = [p.name for p in self.layers]
        return names[0] if len(set(names)) == 1 else "-".join(names)

    def to_dict(self, **extra) -> dict:
        return {
            "method": "kvtuner",
            "mode": self.mode,
            "group_size": self.group,
            "residual": self.residual,
            "layers": [{"layer": i, "k_bits": p.k, "v_bits": p.v} for i, p in enumerate(self.layers)],
            "equivalent_bits": self.nominal_bits,
            "mixed": len(set(self.layers)) > 1,
            **self.extra,
            **extra,
        }

    def to_json(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(**extra), indent=2))
        return path

    @classmethod
    def from_dict(cls, d: dict, budget: float | None = None) -> KVQuantConfig:
        """One map, or from a multi-budget file {"maps": {str(budget): map}} the map for `budget`."""
        if isinstance(d.get("maps"), dict):
            maps = d["maps"]
            if budget is None and len(maps) == 1:
                return cls.from_dict(next(iter(maps.values())))
            hit = [k for k in maps if budget is not None and abs(float(k) - budget) < 1e-6]
            if not hit:
                raise ValueError(f"budget={budget!r}: kv_precision file has maps for budgets {sorted(maps)}")
            return cls.from_dict(maps[hit[0]])
        try:
            layers = [Pair(int(e["k_bits"]), int(e["v_bits"])) for e in sorted(d["layers"], key=lambda e: e["layer"])]
            return cls(tuple(layers), mode=d["mode"], group=int(d["group_size"]), residual=int(d["residual"]))
        except KeyError as e:
            raise ValueError(f"kv_precision config is missing field {e}") from e

    @classmethod
    def from_json(cls, path: str | Path, budget: float | None = None) -> KVQuantConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"kv_precision file {str(path)!r} does not exist")
        return cls.from_dict(json.loads(path.read_text()), budget)


def parse_map(text: str | Sequence[str], n_layers: int) -> tuple[Pair, ...]:
    """'KV4' (uniform) or 'K8V4,KV4,...' (one per layer) -> per-layer pairs [N]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = [parse_pair(x) for x in items]
    if len(pairs) == 1:
        return tuple(pairs * n_layers)
    if len(pairs) != n_layers:
        raise ValueError(f"precision map {text!r} has {len(pairs)} entries, the model has {n_layers} layers")
    return tuple(pairs)
