"""Tables and the plot of the balancing experiment (pure pandas / matplotlib, no tracking)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from workers.stats import markdown_table

# the columns compared across arms, in report order
COLUMNS = (
    "maxvio_step1",
    "maxvio_1_20",
    "avg_maxvio",
    "sup_maxvio",
    "maxvio_last20",
    "heldout_global_maxvio",
    "heldout_ppl",
    "heldout_bpb",
    "final_train_loss",
    "tokens_per_s",
    "router_ms_per_step",
    "straggler_ratio",
)


def trials_table(trials: list[dict]) -> pd.DataFrame:
    """One row per (arm, seed) with its summary metrics."""
    return pd.DataFrame([{"arm": t["arm"], "seed": t["seed"], **t["summary"]} for t in trials])


def comparison_table(per_trial: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """Per arm: mean, sample standard deviation and n over seeds of every compared column."""
    cols = [c for c in COLUMNS if c in per_trial.columns]
    g = per_trial.groupby("arm")[cols]
    mean, std = g.mean().add_suffix("_mean"), g.std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out["n_seeds"] = g.size()
    out = out[[f"{c}_{s}" for c in cols for s in ("mean", "std")] + ["n_seeds"]]
    return out.reindex([a for a in arms if a in out.index]).reset_index()


def markdown(table: pd.DataFrame, columns: tuple[str, ...] = COLUMNS, digits: int = 3) -> str:
    """`mean ± std` cells, one row per arm (for docs)."""
    cols = [c for c in columns if f"{c}_mean" in table.columns]

    def cell(m: float, s: float) -> str:
        return f"{m:.{digits}g} ± {s:.2g}" if pd.notna(s) else f"{m:.{digits}g}"

    rows = [
        {"arm": r["arm"], **{c: cell(r[f"{c}_mean"], r[f"{c}_std"]) for c in cols}} for r in table.to_dict("records")
    ]
    return markdown_table(rows, ["arm", *cols])


def plot_maxvio(trials: list[dict], arms: list[str], path: Path) -> Path:
    """MaxVio (mean over layers) against step, one line per arm (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in arms:
        runs = [np.asarray(t["series"]["maxvio"]) for t in trials if t["arm"] == arm]
        if not runs:
            continue
        steps = min(len(r) for r in runs)
        stack = np.stack([r[:steps] for r in runs])
        x = np.arange(1, steps + 1)
        (line,) = ax.plot(x, stack.mean(0), label=arm, lw=1.2)
        ax.fill_between(x, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.15)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio (mean over layers)")
    ax.set_title("Expert load imbalance during training")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
