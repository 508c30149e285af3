"""Small actors for the pool tests, in a module Ray workers can import."""

from __future__ import annotations

import os
import time

import numpy as np


class Scale:
    """Interchangeable: run(i) = weights[i] * i, slow enough for a kill to land mid-map."""

    def __init__(self, weights: np.ndarray):
        self.weights = weights

    def run(self, i: int) -> float:
        time.sleep(0.05)
        return float(self.weights[i] * i)

    def die(self, _) -> None:
        os._exit(1)


class Shard:
    """Stateful: a shard of values plus an offset the driver commits step by step."""

    def __init__(self, values: list[float]):
        self.values, self.offset = values, 0.0

    def set(self, offset: float) -> None:
        self.offset = offset

    def shift(self, by: float) -> None:
        self.offset += by

    def total(self) -> float:
        return sum(v + self.offset for v in self.values)
