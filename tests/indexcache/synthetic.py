"""A model-free CandidateEvaluator for testing the search logic.

Row r's loss for a pattern is a fixed function of which layers are S and of how long the
S runs are (reusing an index for many layers costs more), plus a per-row, per-layer offset,
so slices of the set rank candidates slightly differently from the full set. Costs are
counted the way the real evaluators run layers (prefix reuse with a lazily refreshed cache,
or naive full forwards), independently of tuning.indexcache.cost.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from tuning.indexcache.losses import LossSum
from tuning.indexcache.patterns import flip, serving_layer


class SyntheticEvaluator:
    def __init__(self, n_layers: int, n_rows: int = 16, seed: int = 0, mode: str = "prefix", flat: bool = False):
        rng = random.Random(seed)
        self.n_layers, self.n_rows, self.mode = n_layers, n_rows, mode
        self.cost = [0.0] + [0.0 if flat else rng.uniform(0.01, 0.1) for _ in range(1, n_layers)]
        self.noise = [[0.0 if flat else rng.gauss(0, 0.004) for _ in range(n_layers)] for _ in range(n_rows)]
        self.pattern = "F" * n_layers
        self.stale_from: int | None = None
        self._units = 0

    def row_loss(self, pattern: str, r: int) -> float:
        serve = serving_layer(pattern)
        loss = 2.0
        for layer, c in enumerate(pattern):
            if c == "S":
                dist = layer - serve[layer]
                loss += self.cost[layer] * (1 + 0.3 * math.log(dist)) + self.noise[r][layer]
        return loss

    def total_rows(self) -> int:
        return self.n_rows

    def rows(self, fraction: float) -> int:
        return max(1, math.ceil(fraction * self.n_rows))

    def units(self) -> int:
        return self._units

    def _loss(self, pattern: str, n: int) -> LossSum:
        return LossSum(sum(self.row_loss(pattern, r) * 10 for r in range(n)), 10 * n)

    def reset(self, pattern: str) -> LossSum:
        self.pattern, self.stale_from = pattern, None
        self._units += self.n_rows * self.n_layers
        return self._loss(pattern, self.n_rows)

    def evaluate(self, candidates: Sequence[int], fraction: float) -> dict[int, LossSum]:
        if self.mode == "prefix" and self.stale_from is not None:
            self._units += self.n_rows * (self.n_layers - self.stale_from)
            self.stale_from = None
        n = self.rows(fraction)
        out = {}
        for layer in candidates:
            self._units += n * (self.n_layers if self.mode == "naive" else self.n_layers - layer)
            out[layer] = self._loss(flip(self.pattern, layer), n)
        return out

    def commit(self, layer: int) -> None:
        self.pattern = flip(self.pattern, layer)
        self.stale_from = layer if self.stale_from is None else min(self.stale_from, layer)
