"""Loss sums that reduce exactly across calibration shards, and the evaluator contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LossSum:
    """Summed next-token NLL (nats) and the number of predicted tokens it covers.

    Shards return sums, not means, so the driver's reduction equals one big evaluation.
    """

    sum_nll: float
    tokens: int

    def __add__(self, other: LossSum) -> LossSum:
        return LossSum(self.sum_nll + other.sum_nll, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        if self.tokens <= 0:
            raise ValueError("mean of an empty LossSum")
        return self.sum_nll / self.tokens

    def to_list(self) -> list:
        return [self.sum_nll, self.tokens]

    @classmethod
    def from_list(cls, v: Sequence) -> LossSum:
        return cls(float(v[0]), int(v[1]))


def reduce_shards(parts: Sequence[dict[int, LossSum]]) -> dict[int, LossSum]:
    """Sum per-candidate losses over shards, always in shard order (deterministic floats)."""
    if not parts:
        raise ValueError("reduce_shards needs at least one shard")
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise RuntimeError(f"shards disagree on candidates: {sorted(keys)} vs {sorted(p)}")
    out = {}
    for k in sorted(keys):
        total = parts[0][k]
        for p in parts[1:]:
            total = total + p[k]
        out[k] = total
    return out


class CandidateEvaluator(Protocol):
    """What the greedy search needs from whoever runs the model.

    The evaluator holds the committed pattern. Costs are counted in sequence-layer forwards
    (one layer run over one calibration window), so slices of the set count proportionally.
    """

    n_layers: int

    def total_rows(self) -> int:
        """Number of calibration windows (over all shards)."""
        ...

    def rows(self, fraction: float) -> int:
        """Windows scored at `fraction` of the calibration set (summed over shards)."""
        ...

    def reset(self, pattern: str) -> LossSum:
        """Make `pattern` the committed pattern and return its loss on the full set."""
        ...

    def evaluate(self, candidates: Sequence[int], fraction: float) -> dict[int, LossSum]:
        """Loss of the committed pattern with each candidate layer flipped to S."""
        ...

    def commit(self, layer: int) -> None:
        """Flip `layer` to S in the committed pattern."""
        ...

    def units(self) -> int:
        """Sequence-layer forwards run so far."""
        ...
