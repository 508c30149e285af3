"""`KVQuantConfig`: a per-layer (key bits, value bits) map plus quantizer settings, and its bit accounting.

Bits (spec/kvtuner.md):
- nominal equivalent bits = mean over layers of (k_bits + v_bits) / 2;
- stored bits per K/V element also count each group's fp32 scale and min and the
  full-precision window, for a given context length (`stored_bits(n_tokens, head_dim)`).

Its file, `kv_precision.json`, is written and read by workers.kvtuner.artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kernels.kv_quant import MODES, group_shape, words_per_vector
from tuning.kvtuner.space import Pair, equivalent_bits, parse_pair

SCALE_BYTES = 4  # kernels.kv_quant stores scale and min in fp32
# "full": the keys and values a forward writes are attended at full precision by that forward (the
# prefill attends its own K/V unquantized, as KIVI and transformers' QuantizedCache do) and stored
# quantized for the forwards after it. "quantized": a forward already attends to what the cache
# stores after its write (the project's behaviour before the regime existed).
PREFILL_REGIMES = ("full", "quantized")


@dataclass(frozen=True)
class KVQuantConfig:
    """Per-layer precision map [N] and the quantizer shared by the fake-quant and packed caches.

    mode: "kivi" (keys per channel over `group` tokens, values per token over `group` channels)
    or "per_token" (each token's head vector is one group). residual: the newest tokens kept in
    full precision (at least `residual`, fewer than residual + block, block = group in KIVI, 1 per token).
    prefill: one of PREFILL_REGIMES (what a forward attends to of the tokens it writes).
    """

    layers: tuple[Pair, ...]
    mode: str = "kivi"
    group: int = 32
    residual: int = 32
    prefill: str = "full"

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
        if self.prefill not in PREFILL_REGIMES:
            raise ValueError(f"KVQuantConfig.prefill must be one of {PREFILL_REGIMES}, got {self.prefill!r}")

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


def parse_map(text: str | Sequence[str], n_layers: int) -> tuple[Pair, ...]:
    """'KV4' (uniform) or 'K8V4,KV4,...' (one per layer) -> per-layer pairs [N]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = [parse_pair(x) for x in items]
    if len(pairs) == 1:
        return tuple(pairs * n_layers)
    if len(pairs) != n_layers:
        raise ValueError(f"precision map {text!r} has {len(pairs)} entries, the model has {n_layers} layers")
    return tuple(pairs)
