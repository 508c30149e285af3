"""Multi-fidelity candidate scoring for one greedy IndexCache step (successive halving).

Early greedy steps are near-ties, late steps are clear, and most candidates are obviously
worse than the best. So each step first scores every candidate on a small slice of the
calibration set, keeps the most promising ceil(n / eta) (at least `min_keep`), and only
those reach the next, larger slice; the last rung is always the full calibration set, so
the committed layer's loss is exact and comparable with the exact search's losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tuning.indexcache.losses import LossSum

# evaluate(candidates, fraction) -> {layer: LossSum over the first `fraction` of every shard}
EvaluateFn = Callable[[Sequence[int], float], dict[int, LossSum]]


@dataclass(frozen=True)
class FidelityConfig:
    """Successive-halving schedule: calibration fractions per rung (increasing, last 1.0)."""

    rungs: tuple[float, ...] = (0.25, 1.0)
    eta: float = 4.0
    min_keep: int = 2

    def __post_init__(self) -> None:
        rungs = tuple(float(r) for r in self.rungs)
        object.__setattr__(self, "rungs", rungs)
        if not rungs or any(not 0.0 < r <= 1.0 for r in rungs):
            raise ValueError(f"fidelity rungs must be fractions in (0, 1], got {self.rungs!r}")
        if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[-1] != 1.0:
            raise ValueError(f"fidelity rungs must increase strictly and end at 1.0, got {self.rungs!r}")
        if not self.eta > 1.0:
            raise ValueError(f"fidelity eta must be > 1, got {self.eta!r}")
        if self.min_keep < 1:
            raise ValueError(f"fidelity min_keep must be >= 1, got {self.min_keep!r}")

    def to_dict(self) -> dict:
        return {"rungs": list(self.rungs), "eta": self.eta, "min_keep": self.min_keep}

    @classmethod
    def from_dict(cls, d: dict) -> FidelityConfig:
        return cls(rungs=tuple(d["rungs"]), eta=float(d["eta"]), min_keep=int(d["min_keep"]))


EXACT = FidelityConfig(rungs=(1.0,))


def rank(losses: dict[int, LossSum]) -> list[int]:
    """Layers ordered best first: lowest mean NLL, ties broken by the lowest layer index."""
    return sorted(losses, key=lambda layer: (losses[layer].mean, layer))


def n_survivors(n_alive: int, cfg: FidelityConfig) -> int:
    """How many candidates a non-final rung passes on."""
    return min(n_alive, max(cfg.min_keep, math.ceil(n_alive / cfg.eta)))


def score_candidates(
    candidates: Sequence[int], evaluate: EvaluateFn, cfg: FidelityConfig = EXACT
) -> tuple[dict[int, LossSum], list[tuple[float, dict[int, LossSum]]]]:
    """Score `candidates` rung by rung; return (final-rung losses, every rung's losses).

    A rung that could not prune anything (no more candidates than would survive it) is
    skipped: scoring a slice that decides nothing is pure cost.
    """
    alive = sorted(candidates)
    if not alive:
        raise ValueError("score_candidates needs at least one candidate")
    rungs: list[tuple[float, dict[int, LossSum]]] = []
    for i, fraction in enumerate(cfg.rungs):
        last = i == len(cfg.rungs) - 1
        if not last and n_survivors(len(alive), cfg) >= len(alive):
            continue
        losses = evaluate(alive, fraction)
        missing = set(alive) - set(losses)
        if missing:
            raise RuntimeError(f"evaluator returned no loss for candidate layers {sorted(missing)}")
        rungs.append((fraction, {layer: losses[layer] for layer in alive}))
        if last:
            return rungs[-1][1], rungs
        alive = sorted(rank(rungs[-1][1])[: n_survivors(len(alive), cfg)])
    raise AssertionError("unreachable: the last rung always returns")
