"""Figures and tables of a PrefixKV run: curves, per-layer budgets, method comparisons.

Shape legend: L layers, R keep ratios, P curve points.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from workers.stats import markdown_table, mean_se, paired_difference


def curves_figure(curves: np.ndarray, title: str):
    """curves [L, P]: share of attention mass kept vs fraction of tokens kept, one line per layer."""
    fig, ax = plt.subplots(figsize=(5, 4))
    x = np.linspace(0, 1, curves.shape[1])
    cmap = plt.get_cmap("viridis")
    for layer, c in enumerate(curves):
        ax.plot(x, c, color=cmap(layer / max(1, len(curves) - 1)), label=f"layer {layer}")
    ax.plot(x, x, "k:", lw=0.8, label="uniform importance")
    ax.set(xlabel="fraction of prompt tokens kept (top by importance)", ylabel="attention mass kept", title=title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def budgets_figure(ratios: Sequence[float], fractions: np.ndarray, se: np.ndarray, show: Sequence[float], title: str):
    """Per-layer keep fractions at the `show` ratios, with bootstrap standard errors as error bars."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    n_layers = fractions.shape[1]
    width = 0.8 / max(1, len(show))
    for i, r in enumerate(show):
        j = min(range(len(ratios)), key=lambda k: abs(ratios[k] - r))
        xs = np.arange(n_layers) + (i - (len(show) - 1) / 2) * width
        err = np.nan_to_num(se[j]) * 1.96
        ax.bar(xs, fractions[j], width, yerr=err, capsize=2, label=f"keep {ratios[j]:g}")
        ax.axhline(ratios[j], color=f"C{i}", ls=":", lw=0.8)
    ax.set(xlabel="layer", ylabel="keep fraction", title=title, xticks=range(n_layers))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def summarize(per_example: dict[str, list[float]], baseline_of) -> list[dict]:
    """{key: per-example values} -> rows with mean, se and paired difference to a baseline key.

    baseline_of(key) -> the key to compare with (same examples) or None.
    """
    rows = []
    for key, vals in per_example.items():
        m, se = mean_se(vals)
        row = {"key": key, "mean": m, "se": se, "n": len(vals)}
        base = baseline_of(key)
        if base is not None and base in per_example:
            d, dse = paired_difference(vals, per_example[base])
            row.update(baseline=base, diff=d, diff_se=dse)
        rows.append(row)
    return rows


def results_table(rows: list[dict], value_name: str) -> str:
    """The rows of `summarize` as a markdown table (value_name: what `mean` measures)."""
    header = ("method@ratio", value_name, "SE", "vs", "paired diff", "diff SE")
    cols = ("key", "mean", "se", "baseline", "diff", "diff_se")
    if rows and "bpb" in rows[0]:  # text NLL: bits/byte too, comparable across tokenizers
        header, cols = header + ("bits/byte",), cols + ("bpb",)
    return markdown_table(rows, cols, header=header, number=".4f")
