"""Analytic cost of a committed greedy trace, in sequence-layer forwards.

One unit is one transformer layer run over one calibration window. With R windows and N
layers a full forward is R * N units; dividing by R gives "layer forwards", the number the
spec quotes (naive search for N=12, K=9: 64 full forwards = 768 layer forwards).

- naive:  every evaluation (the all-F baseline and every candidate at every rung) runs all
          N layers over its rows.
- prefix: the baseline fills the prefix cache (N layers over all rows); a candidate at layer
          l reruns layers l..N-1 over its rows; committing layer c makes the cache stale from
          c on, and it is refreshed (N - c layers over all rows) only if another step follows.
"""

from __future__ import annotations

from collections.abc import Callable

from tuning.indexcache.search import SearchState


def analytic_units(state: SearchState, rows: Callable[[float], int], total_rows: int) -> int:
    """Units an uninterrupted search with this trace runs (`rows(fraction)` as the evaluator's)."""
    n = state.n_layers
    units = total_rows * n
    for i, step in enumerate(state.steps):
        for fraction, losses in step.rungs:
            r = rows(fraction)
            for layer in losses:
                units += r * (n if state.mode == "naive" else n - layer)
        if state.mode == "prefix" and i + 1 < len(state.steps):
            units += total_rows * (n - step.committed)
    return units


def naive_units(n_layers: int, n_steps: int, total_rows: int) -> int:
    """Units of the naive exact search: (1 + K(N-1) - K(K-1)/2) full forwards."""
    evals = 1 + n_steps * (n_layers - 1) - n_steps * (n_steps - 1) // 2
    return evals * n_layers * total_rows


def layer_forwards(units: int, total_rows: int) -> float:
    """Units expressed as full-calibration-set layer forwards."""
    return units / total_rows
