"""Per-sample PrefixKV calibration and the deterministic reduction over samples.

Shape legend: L layers, B samples in a batch, N prompt tokens, R keep ratios, P curve points.

1. `calibrate_batch`: one cache-less prefill of B samples -> per sample, per score mode, the
   bisection solution for every ratio on the grid (fractions [R, L], steps, thresholds), a check
   that the k-th-value solution agrees, and the layer curves resampled on P points for plots.
2. `reduce_samples`: results sorted by sample index (the order Ray returned them in never
   matters), mean fractions [R, L] and a bootstrap standard error over samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tuning.prefixkv.search import RATIO_GRID, build_curves, solve_bisect, solve_kth
from workers.caches.scoring import ScoreConfig
from workers.prefixkv.importance import collect_importance

CURVE_POINTS = 101


def curve_on_grid(curve, points: int = CURVE_POINTS) -> list[float]:
    """Share of a layer's attention mass kept by its top ceil(x * N) tokens, x in linspace(0, 1, P)."""
    n = curve.n_tokens
    idx = np.ceil(np.linspace(0.0, 1.0, points) * n).astype(int)
    return curve.cum[idx].round(6).tolist()


def calibrate_batch(
    model,
    tokens: torch.Tensor,
    scores: Sequence[ScoreConfig],
    n_sink: int,
    ratios: Sequence[float] = RATIO_GRID,
    max_steps: int = 64,
) -> list[dict]:
    """tokens [B, N] -> B dicts {score mode: {fractions [R][L], steps [R], thresholds [R], curves [L][P]}}."""
    n_layers = model.cfg.n_layers
    out = [{} for _ in range(tokens.shape[0])]
    for score in scores:
        imp = collect_importance(model, tokens, score, n_layers)  # [L, B, N]
        for b in range(tokens.shape[0]):
            curves = build_curves(imp[:, b].numpy(), n_sink)
            fr, steps, thr, agree = [], [], [], True
            for r in ratios:
                sol = solve_bisect(curves, r, max_steps)
                agree &= sol.counts.tolist() == solve_kth(curves, r).counts.tolist()
                fr.append(sol.fractions(curves).tolist())
                steps.append(sol.steps)
                thr.append(sol.threshold)
            out[b][score.mode] = {
                "fractions": fr,
                "steps": steps,
                "thresholds": thr,
                "kth_agrees": bool(agree),
                "curves": [curve_on_grid(c) for c in curves],
            }
    return out


def bootstrap_se(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """values [S, ...] -> standard deviation of the mean over `n_boot` resamples of the S samples."""
    s = values.shape[0]
    if s < 2 or n_boot < 1:
        return np.full(values.shape[1:], np.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, s, size=(n_boot, s))
    means = values[idx].mean(axis=1)
    return means.std(axis=0, ddof=1)


def reduce_samples(results: dict[int, dict], mode: str, n_boot: int = 200, seed: int = 0) -> dict:
    """{sample index: calibrate_batch entry} -> mean / spread over samples for one score mode.

    Returns fractions [R, L] (mean), bootstrap_se [R, L], sample_sd [R, L], curves [L, P] (mean),
    max_steps_taken, kth_agrees (all samples).
    """
    if not results:
        raise ValueError("no calibration samples to reduce")
    keys = sorted(results)
    fr = np.array([results[k][mode]["fractions"] for k in keys], dtype=np.float64)  # [S, R, L]
    curves = np.array([results[k][mode]["curves"] for k in keys], dtype=np.float64)  # [S, L, P]
    return {
        "fractions": fr.mean(0),
        "bootstrap_se": bootstrap_se(fr, n_boot, seed),
        "sample_sd": fr.std(0, ddof=1) if fr.shape[0] > 1 else np.full(fr.shape[1:], np.nan),
        "curves": curves.mean(0),
        "max_steps_taken": int(max(max(results[k][mode]["steps"]) for k in keys)),
        "kth_agrees": all(results[k][mode]["kth_agrees"] for k in keys),
        "n_samples": len(keys),
    }
