"""PrefixKV budget search: per-layer KV keep counts under one global budget.

Shape legend: L layers, N_l prompt tokens seen by layer l (one prefill gives the same N to
every layer; the search allows them to differ), M = sum_l (N_l - protected_l) candidates.

1. `build_curves` turns each layer's importance vector (attention each prompt token receives)
   into a cumulative curve: protected tokens (the first `n_sink` and the last token) first,
   then the rest by decreasing importance, normalised so the whole layer sums to 1.
2. One global threshold p: layer l keeps the smallest n_l >= protected_l with curve_l(n_l) >= p.
   Token j of layer l's order is therefore kept iff its *entry key* curve_l(j) < p, so the
   total kept is protected + #{keys < p}, a step function of p.
3. `solve_bisect` bisects p in a bounded number of steps, then fixes rounding by taking the
   smallest keys left in the final interval; `solve_kth` selects the k smallest keys over all
   layers at once. Both order keys by (value, rank, layer), so they return identical counts,
   every layer's kept set is a prefix of its order, and counts never shrink as the ratio grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Keep ratios solved per calibration sample (0.05, 0.10, ..., 0.95).
RATIO_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
METHODS = ("bisect", "kth")


@dataclass(frozen=True)
class SearchConfig:
    """How the search protects tokens and how long bisection may run."""

    n_sink: int = 4
    max_steps: int = 64

    def __post_init__(self):
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"SearchConfig.n_sink must be an int >= 0, got {self.n_sink!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"SearchConfig.max_steps must be an int >= 1, got {self.max_steps!r}")


@dataclass(frozen=True)
class LayerCurve:
    """One layer's curve.

    order: [N] token indices, protected tokens first, then decreasing importance (ties: lower index).
    cum:   [N+1] float64, cum[n] = share of the layer's importance held by order[:n]; cum[0] = 0.
    n_protected: tokens always kept (sinks and the last token).
    """

    order: np.ndarray
    cum: np.ndarray
    n_protected: int

    @property
    def n_tokens(self) -> int:
        return int(self.order.shape[0])

    @property
    def keys(self) -> np.ndarray:
        """[N - n_protected] entry keys, non-decreasing: token order[j] is kept iff cum[j] < p."""
        return self.cum[self.n_protected : self.n_tokens]


@dataclass(frozen=True)
class Solution:
    """counts: [L] tokens kept per layer (protected included); threshold: the p reached;
    steps: bisection steps taken (0 for the k-th-value solution); budget: sum of counts."""

    counts: np.ndarray
    threshold: float
    steps: int
    budget: int

    def fractions(self, curves: Sequence[LayerCurve]) -> np.ndarray:
        """[L] keep fraction per layer."""
        return self.counts / np.array([c.n_tokens for c in curves], dtype=np.float64)


def validate_ratio(ratio: float) -> float:
    """A keep ratio must be a finite number in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.floating):
        raise ValueError(f"keep ratio must be a number in (0, 1], got {ratio!r}")
    r = float(ratio)
    if not np.isfinite(r) or not 0.0 < r <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio!r}")
    return r


def n_protected(n_tokens: int, n_sink: int) -> int:
    """Tokens always kept in a layer of `n_tokens`: the first `n_sink` plus the last one."""
    if n_tokens < 1:
        raise ValueError(f"a layer needs at least one token, got {n_tokens}")
    if n_tokens < n_sink:
        raise ValueError(f"context of {n_tokens} tokens is shorter than n_sink={n_sink} sink tokens")
    return min(n_sink, n_tokens - 1) + 1


def build_curve(importance, n_sink: int) -> LayerCurve:
    """importance: [N] non-negative attention received per token -> LayerCurve."""
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    n = imp.shape[0]
    n_prot = n_protected(n, n_sink)
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError("importance must be finite and non-negative")
    protected = np.zeros(n, dtype=bool)
    protected[: min(n_sink, n)] = True
    protected[n - 1] = True
    rest = np.flatnonzero(~protected)
    # Stable sort on -importance: equal scores keep their original (lower index first) order.
    rest = rest[np.argsort(-imp[rest], kind="stable")]
    order = np.concatenate([np.flatnonzero(protected), rest])
    total = imp.sum()
    # A layer with no attention mass carries no information: treat its tokens as equal.
    share = imp[order] / total if total > 0 else np.full(n, 1.0 / n)
    cum = np.concatenate([[0.0], np.cumsum(share)])
    return LayerCurve(order=order, cum=cum, n_protected=n_prot)


def build_curves(importances: Sequence, n_sink: int) -> list[LayerCurve]:
    """importances: L vectors [N_l] (or an [L, N] array) -> one curve per layer."""
    if len(importances) == 0:
        raise ValueError("need importance for at least one layer")
    return [build_curve(imp, n_sink) for imp in importances]


def global_budget(ratio: float, n_tokens: int, n_protected_total: int, n_layers: int) -> int:
    """Tokens kept over all layers at `ratio`: round(ratio * n_tokens) of the `n_tokens` the layers
    hold together, refused when fewer than their `n_protected_total` always-kept ones.

    The one budget rule: calibration (`budget_total`), eviction (`plan.plan_counts`) and the
    pipeline's up-front check of --context all round the total, not each layer, so a context
    whose per-layer share rounds up (0.05 * 96 = 4.8 -> 5) can still fall short in total (19 < 20)."""
    r = validate_ratio(ratio)
    budget = int(np.floor(r * n_tokens + 0.5))
    if budget < n_protected_total:
        raise ValueError(
            f"keep ratio {r} gives {budget} tokens over {n_layers} layers, fewer than the "
            f"{n_protected_total} always-kept sink and last tokens; raise the ratio or the context length"
        )
    return budget


def budget_total(curves: Sequence[LayerCurve], ratio: float) -> int:
    """Tokens kept over all layers at `ratio` (global_budget of the curves' layers)."""
    total = sum(c.n_tokens for c in curves)
    return global_budget(ratio, total, sum(c.n_protected for c in curves), len(curves))


def _ranked(curves: Sequence[LayerCurve], lo: float, hi: float):
    """Entry keys in [lo, hi) of every layer, sorted by (value, rank, layer) -> (layer ids, ...)."""
    values, ranks, layers = [], [], []
    for l_idx, c in enumerate(curves):
        keys = c.keys
        a, b = np.searchsorted(keys, lo, "left"), np.searchsorted(keys, hi, "left")
        values.append(keys[a:b])
        ranks.append(np.arange(a, b))
        layers.append(np.full(b - a, l_idx))
    values, ranks, layers = (np.concatenate(x) for x in (values, ranks, layers))
    idx = np.lexsort((layers, ranks, values))
    return layers[idx], values[idx]


def _counts_below(curves: Sequence[LayerCurve], p: float) -> np.ndarray:
    """[L] candidate tokens with entry key < p per layer."""
    return np.array([np.searchsorted(c.keys, p, "left") for c in curves], dtype=np.int64)


def solve_kth(curves: Sequence[LayerCurve], ratio: float) -> Solution:
    """Keep the k smallest entry keys over all layers (k = budget minus protected tokens)."""
    budget = budget_total(curves, ratio)
    base = np.array([c.n_protected for c in curves], dtype=np.int64)
    k = budget - int(base.sum())
    layers, values = _ranked(curves, -np.inf, np.inf)
    extra = np.bincount(layers[:k], minlength=len(curves)).astype(np.int64)
    threshold = float(values[k - 1]) if k > 0 else 0.0
    return Solution(counts=base + extra, threshold=threshold, steps=0, budget=budget)


def solve_bisect(curves: Sequence[LayerCurve], ratio: float, max_steps: int = 64) -> Solution:
    """Bisect the global threshold p for at most `max_steps` steps, then make the total exact.

    Invariant: #{keys < lo} <= k <= #{keys < hi}. Bisection stops early when a threshold hits k
    exactly or when the interval cannot be halved in float64; the tokens still missing are the
    smallest keys in [lo, hi) by (value, rank, layer) -- ties across layers land here.
    """
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    budget = budget_total(curves, ratio)
    base = np.array([c.n_protected for c in curves], dtype=np.int64)
    k = budget - int(base.sum())
    if k == 0:
        return Solution(counts=base, threshold=0.0, steps=0, budget=budget)
    top = max(float(c.keys[-1]) for c in curves if c.keys.size)
    lo, hi = 0.0, float(np.nextafter(top, np.inf))
    steps = 0
    for _ in range(max_steps):
        mid = lo + (hi - lo) / 2
        if not lo < mid < hi:
            break
        steps += 1
        below = _counts_below(curves, mid)
        n_below = int(below.sum())
        if n_below == k:
            return Solution(counts=base + below, threshold=mid, steps=steps, budget=budget)
        if n_below < k:
            lo = mid
        else:
            hi = mid
    below = _counts_below(curves, lo)
    layers, values = _ranked(curves, lo, hi)
    need = k - int(below.sum())
    extra = np.bincount(layers[:need], minlength=len(curves)).astype(np.int64)
    counts = base + below + extra
    return Solution(counts=counts, threshold=float(values[need - 1]), steps=steps, budget=budget)


def solve(curves: Sequence[LayerCurve], ratio: float, method: str = "bisect", max_steps: int = 64) -> Solution:
    """Dispatch to `solve_bisect` or `solve_kth`."""
    if method == "bisect":
        return solve_bisect(curves, ratio, max_steps)
    if method == "kth":
        return solve_kth(curves, ratio)
    raise ValueError(f"unknown PrefixKV search method {method!r}; expected one of {METHODS}")


def solve_grid(
    curves: Sequence[LayerCurve],
    ratios: Sequence[float] = RATIO_GRID,
    method: str = "bisect",
    max_steps: int = 64,
) -> dict[float, Solution]:
    """Every keep ratio from one set of curves (one prefill): {ratio: Solution}."""
    checked = [validate_ratio(r) for r in ratios]
    if len(set(checked)) != len(checked):
        raise ValueError(f"keep ratios must be distinct, got {list(ratios)}")
    return {r: solve(curves, r, method, max_steps) for r in checked}


def grid_fractions(curves: Sequence[LayerCurve], cfg: SearchConfig, ratios=RATIO_GRID) -> np.ndarray:
    """[R, L] keep fraction per (ratio, layer) for one sample, by bisection."""
    sols = solve_grid(curves, ratios, "bisect", cfg.max_steps)
    return np.stack([sols[r].fractions(curves) for r in sols])
