"""KVTuner search space: precision pairs, equivalent bits, per-layer Pareto pruning, layer clustering.

Shape legend: N layers, P candidate pairs (9 = {2,4,8}^2), G layer groups.

1. A layer's choice is a `Pair` (key bits, value bits), written K8V4, or KV4 when both agree.
2. Equivalent bits (nominal) of a per-layer map = mean over layers of (k + v) / 2.
3. `pareto_prune`: per layer keep only pairs that no other pair beats on both bits and damage.
4. `cluster_layers`: k-means on the layers' log-damage profiles; layer 0 is always alone
   (it is the most sensitive layer in every published profile and in ours), the other
   N - 1 layers fall into k = min(requested, N - 1) groups. One choice per group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BITS: tuple[int, ...] = (2, 4, 8)
_PAIR_RE = re.compile(r"^(?:KV(\d+)|K(\d+)V(\d+))$")


@dataclass(frozen=True, order=True)
class Pair:
    """Bits of one layer's keys and values, each in {2, 4, 8}."""

    k: int
    v: int

    def __post_init__(self):
        for name, b in (("k", self.k), ("v", self.v)):
            if b not in BITS:
                raise ValueError(f"Pair.{name} bits must be one of {BITS}, got {b!r}")

    @property
    def bits(self) -> float:
        return (self.k + self.v) / 2

    @property
    def name(self) -> str:
        return f"KV{self.k}" if self.k == self.v else f"K{self.k}V{self.v}"

    def __str__(self) -> str:
        return self.name


PAIRS: tuple[Pair, ...] = tuple(Pair(k, v) for k in reversed(BITS) for v in reversed(BITS))
UNIFORM_BASELINES: tuple[str, ...] = ("KV8", "K8V4", "KV4", "K4V2", "KV2")


def parse_pair(text: str | Pair) -> Pair:
    """'K8V4' / 'KV4' / 'k4v2' -> Pair; raises ValueError naming the text."""
    if isinstance(text, Pair):
        return text
    m = _PAIR_RE.match(str(text).strip().upper())
    if not m:
        raise ValueError(f"precision pair {text!r} is not of the form K<bits>V<bits> or KV<bits>")
    if m.group(1):
        b = int(m.group(1))
        return Pair(b, b)
    return Pair(int(m.group(2)), int(m.group(3)))


def equivalent_bits(layer_pairs: Sequence[Pair]) -> float:
    """Nominal equivalent bits of a per-layer map: mean over layers of (k + v) / 2."""
    if not layer_pairs:
        raise ValueError("a per-layer map needs at least one layer")
    return float(np.mean([p.bits for p in layer_pairs]))


def validate_budget(budget: float) -> float:
    """A budget is average bits per KV element in [2, 8] (2 is the cheapest map there is)."""
    if not isinstance(budget, int | float) or not (2.0 <= float(budget) <= 8.0):
        raise ValueError(f"budget must be average bits in [2, 8], got {budget!r}")
    return float(budget)


def pareto_prune(damage: dict[Pair, float]) -> list[Pair]:
    """Pairs not dominated by a cheaper-or-equal and less-or-equally damaging pair, by falling bits.

    A pair is dominated when another has bits <= and damage <= with one of them strict.
    Among exact ties (same bits and damage) the one with more key bits is kept: keys matter more.
    """

    def beats(q: Pair, e: float, p: Pair, d: float) -> bool:
        if q.bits > p.bits or e > d:
            return False
        return q.bits < p.bits or e < d or q.k > p.k

    keep = [p for p, d in damage.items() if not any(beats(q, e, p, d) for q, e in damage.items() if q != p)]
    return sorted(keep, key=lambda p: (-p.bits, -p.k))


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 16, iters: int = 100) -> np.ndarray:
    """Plain Lloyd k-means with k-means++ seeding; returns labels [n], best of n_init by inertia."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
            probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centers.append(x[rng.choice(n, p=probs)])
        c = np.array(centers)
        labels = np.zeros(n, dtype=int)
        for _ in range(iters):
            new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            for j in range(k):
                if np.any(new == j):
                    c[j] = x[new == j].mean(0)
            if np.array_equal(new, labels) and _ > 0:
                break
            labels = new
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.copy(), inertia
    return best


def cluster_layers(profile: np.ndarray, n_clusters: int, seed: int = 0) -> list[int]:
    """Group layers by sensitivity. profile [N, P] damage (>= 0) -> group id per layer.

    Layer 0 is group 0 on its own; layers 1..N-1 go into k = min(n_clusters, N - 1) k-means
    groups on log10(damage + 1e-6), numbered 1..k in order of first appearance.
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.ndim != 2 or profile.shape[0] < 1:
        raise ValueError(f"profile must be [N layers, P pairs], got shape {profile.shape}")
    if not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an int >= 1, got {n_clusters!r}")
    n = profile.shape[0]
    if n == 1:
        return [0]
    k = min(n_clusters, n - 1)
    feats = np.log10(np.clip(profile[1:], 0.0, None) + 1e-6)
    raw = _kmeans(feats, k, seed) if k < n - 1 else np.arange(n - 1)
    renumber: dict[int, int] = {}
    groups = [0]
    for lab in raw:
        renumber.setdefault(int(lab), len(renumber) + 1)
        groups.append(renumber[int(lab)])
    return groups


def group_candidates(groups: Sequence[int], layer_candidates: Sequence[Sequence[Pair]]) -> list[list[Pair]]:
    """Candidate pairs per group: the union of its layers' Pareto sets, by falling bits then keys."""
    n_groups = max(groups) + 1
    out: list[set[Pair]] = [set() for _ in range(n_groups)]
    for g, cands in zip(groups, layer_candidates):
        out[g].update(cands)
    return [sorted(s, key=lambda p: (-p.bits, -p.k)) for s in out]


def nearest_candidate(target: Pair, candidates: Sequence[Pair]) -> Pair | None:
    """The candidate closest to `target` without more bits: most bits, then nearest key bits.

    Seeds the search with the grouped space's stand-in for each uniform baseline even when a
    group's Pareto pruning removed the exact pair (e.g. K4V2 dominated by K2V4 in layer 0).
    """
    fit = [q for q in candidates if q.bits <= target.bits]
    if not fit:
        return None
    return min(fit, key=lambda q: (target.bits - q.bits, abs(q.k - target.k), -q.k))


def expand(groups: Sequence[int], choice: Sequence[Pair]) -> list[Pair]:
    """Per-group choice [G] -> per-layer map [N]."""
    return [choice[g] for g in groups]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points among (bits, damage), both minimised, by rising bits."""
    idx = []
    for i, (b, d) in enumerate(points):
        dominated = any((b2 <= b and d2 <= d) and (b2 < b or d2 < d) for j, (b2, d2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    # identical points: keep the first only
    seen, out = set(), []
    for i in sorted(idx, key=lambda i: (points[i][0], points[i][1], i)):
        if points[i] not in seen:
            seen.add(points[i])
            out.append(i)
    return out
