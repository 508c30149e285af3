"""Turn per-layer keep fractions into exact per-layer token counts for one context.

A calibrated PrefixKV configuration stores mean keep fractions f_l(r) per ratio r; a new
context of N tokens needs integer counts n_l with sum_l n_l = round(r * L * N) exactly, each
in [protected, N]. The same planner serves the baselines, so every method spends the same
number of tokens: uniform (f_l = r), a fixed PyramidKV-style linear schedule, and PrefixKV.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tuning.prefixkv.search import global_budget, n_protected, validate_ratio

SCHEDULES = ("prefixkv", "uniform", "pyramid")
# PyramidKV's default: the top layer gets 1/beta of the mean budget, the bottom layer 2 - 1/beta.
PYRAMID_BETA = 20.0


def uniform_fractions(n_layers: int, ratio: float) -> np.ndarray:
    """[L] the same fraction r in every layer."""
    return np.full(n_layers, validate_ratio(ratio))


def pyramid_fractions(n_layers: int, ratio: float, beta: float = PYRAMID_BETA) -> np.ndarray:
    """[L] linearly decreasing from layer 0 to the last layer, mean r (before clamping to 1)."""
    r = validate_ratio(ratio)
    if n_layers == 1:
        return np.array([r])
    lo, hi = 1.0 / beta, 2.0 - 1.0 / beta
    return r * np.linspace(hi, lo, n_layers)


def plan_counts(fractions: Sequence[float], n_tokens: int, ratio: float, n_sink: int) -> np.ndarray:
    """[L] int counts, summing exactly to round(ratio * L * n_tokens), each in [protected, N].

    Counts follow `fractions` rescaled to the budget; rounding is by largest remainder, and what
    a clamp removes from one layer is handed to the others in proportion to their wishes.
    """
    r = validate_ratio(ratio)
    f = np.asarray(fractions, dtype=np.float64).reshape(-1)
    n_layers = f.shape[0]
    if n_layers == 0 or not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"fractions must be a non-empty vector of finite values >= 0, got {f.tolist()}")
    lo = n_protected(n_tokens, n_sink)
    budget = global_budget(r, n_layers * n_tokens, lo * n_layers, n_layers)
    want = f if f.sum() > 0 else np.ones(n_layers)
    # clip(s * want, lo, N) grows monotonically with the scale s: bisect s to meet the budget.
    s_lo, s_hi = 0.0, 1.0
    while np.clip(s_hi * want, lo, n_tokens).sum() < budget and s_hi < 1e18:
        s_hi *= 2
    for _ in range(200):
        mid = (s_lo + s_hi) / 2
        if np.clip(mid * want, lo, n_tokens).sum() < budget:
            s_lo = mid
        else:
            s_hi = mid
    real = np.clip(s_hi * want, lo, n_tokens)
    counts = np.floor(real + 1e-9).astype(np.int64)
    rem = real - counts
    # Largest remainder first (ties: lower layer) among layers with room left.
    for j in np.lexsort((np.arange(n_layers), -rem)):
        if counts.sum() >= budget:
            break
        if counts[j] < n_tokens:
            counts[j] += 1
    _fix_total(counts, budget, lo, n_tokens)
    return counts


def _fix_total(counts: np.ndarray, budget: int, lo: int, hi: int) -> None:
    """Last resort after clamping: add to / take from layers with room until the sum is exact."""
    diff = budget - int(counts.sum())
    step = 1 if diff > 0 else -1
    while diff != 0:
        room = counts < hi if step > 0 else counts > lo
        if not room.any():
            raise AssertionError(f"cannot place {budget} tokens in [{lo}, {hi}] per layer")
        j = int(np.flatnonzero(room)[0] if step > 0 else np.flatnonzero(room)[-1])
        counts[j] += step
        diff -= step


def schedule_fractions(
    schedule: str, ratio: float, n_layers: int, calibrated: dict[float, Sequence[float]] | None = None
) -> np.ndarray:
    """[L] fractions of `schedule` at `ratio`; "prefixkv" reads them from a calibrated config.

    A calibrated config maps ratios to [L] fractions; ratio 1.0 keeps everything; a ratio between
    grid points is linearly interpolated (fractions are monotone in r, so this stays consistent).
    """
    r = validate_ratio(ratio)
    if schedule == "uniform":
        return uniform_fractions(n_layers, r)
    if schedule == "pyramid":
        return pyramid_fractions(n_layers, r)
    if schedule != "prefixkv":
        raise ValueError(f"unknown budget schedule {schedule!r}; expected one of {SCHEDULES}")
    if not calibrated:
        raise ValueError("schedule 'prefixkv' needs a calibrated config (ratio -> per-layer fractions)")
    table = {float(k): np.asarray(v, dtype=np.float64) for k, v in calibrated.items()}
    for v in table.values():
        if v.shape != (n_layers,):
            raise ValueError(f"calibrated fractions have shape {v.shape}, the model has {n_layers} layers")
    table.setdefault(1.0, np.ones(n_layers))
    grid = sorted(table)
    if r in table:
        return table[r]
    if r < grid[0]:
        return table[grid[0]] * (r / grid[0])
    hi = next(g for g in grid if g > r)
    lo = max(g for g in grid if g < r)
    t = (r - lo) / (hi - lo)
    return (1 - t) * table[lo] + t * table[hi]
