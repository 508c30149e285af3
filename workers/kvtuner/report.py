"""KVTuner outputs: per-budget selection, the Pareto front and its plot, the profile heatmap.

Pure functions over plain rows (dicts) so the driver stays short and this stays testable.
A search row: {"map": "K8V4,KV4,...", "bits", "damage", "nll", ...}; a report row adds the
held-out task metric with per-example values for paired comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tuning.kvtuner.space import PAIRS, pareto_front


def front_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows on the (bits, damage) Pareto front, by rising bits."""
    pts = [(float(r["bits"]), float(r["damage"])) for r in rows]
    return [rows[i] for i in pareto_front(pts)]


def select_for_budget(rows: Sequence[dict], budget: float, key: str = "damage", higher_is_better: bool = False):
    """Best row with bits <= budget by `key` (ties: fewer bits); None if nothing fits."""
    fit = [r for r in rows if float(r["bits"]) <= budget + 1e-9 and r.get(key) is not None]
    if not fit:
        return None
    sign = -1.0 if higher_is_better else 1.0
    return min(fit, key=lambda r: (sign * float(r[key]), float(r["bits"])))


def plot_pareto(rows: Sequence[dict], baselines: Sequence[dict], path: str, title: str = "") -> None:
    """Calibration damage vs equivalent bits: every evaluated map, the front, uniform baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    floor = 1e-7
    ax.scatter([r["bits"] for r in rows], [max(r["damage"], floor) for r in rows], s=12, c="0.6", label="searched")
    fr = front_rows(rows)
    ax.plot([r["bits"] for r in fr], [max(r["damage"], floor) for r in fr], "o-", c="C0", label="Pareto front")
    for b in baselines:
        ax.scatter([b["bits"]], [max(b["damage"], floor)], marker="s", c="C3")
        ax.annotate(b["name"], (b["bits"], max(b["damage"], floor)), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("equivalent bits (nominal)")
    ax.set_ylabel("KL vs full precision (calibration)")
    ax.set_title(title or "KVTuner Pareto front")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmap(damage: np.ndarray, path: str, groups: Sequence[int] | None = None) -> None:
    """log10 damage [N layers, 9 pairs] as a heatmap, layer groups in the row labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = damage.shape[0]
    fig, ax = plt.subplots(figsize=(6, 0.35 * n + 1.5))
    im = ax.imshow(np.log10(np.clip(damage, 1e-7, None)), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(PAIRS)), [p.name for p in PAIRS], rotation=45, fontsize=8)
    labels = [f"L{i}" + (f" g{groups[i]}" if groups is not None else "") for i in range(n)]
    ax.set_yticks(range(n), labels, fontsize=8)
    fig.colorbar(im, ax=ax, label="log10 KL")
    ax.set_title("sensitivity profile (one layer quantized)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
