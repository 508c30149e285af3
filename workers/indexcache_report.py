"""Reporting for the IndexCache search: paired held-out comparisons, tables, heatmap, JSON.

All NLLs are mean next-token NLL in nats per byte (the tokenizer is bytes); bits per byte
is nats / ln 2. Comparisons are paired over the same held-out windows: d_w = NLL_A(w) -
NLL_B(w), reported as mean(d) and its standard error std(d) / sqrt(n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Paired:
    """Mean paired difference (A - B) over windows and its standard error (nats)."""

    mean: float
    se: float
    n: int

    @property
    def z(self) -> float:
        return self.mean / self.se if self.se > 0 else float("inf") * (1 if self.mean > 0 else -1)


def paired(a: torch.Tensor, b: torch.Tensor) -> Paired:
    """Paired difference of per-window NLLs a, b [W]."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"paired() needs two equal 1-D vectors of >= 2 windows, got {a.shape}, {b.shape}")
    d = (a - b).double()
    return Paired(float(d.mean()), float(d.std(unbiased=True) / math.sqrt(d.numel())), d.numel())


def retention_rows(results: list[dict]) -> list[dict]:
    """Flatten the per-retention results into table rows (one per retention and pattern kind)."""
    rows = []
    for r in results:
        for kind in ("searched", "uniform", "all_f"):
            k = r[kind]
            rows.append(
                {
                    "retention": r["retention"],
                    "n_full": r["n_full"],
                    "kind": kind,
                    "pattern": k["pattern"],
                    "calib_nll": k["calib_nll"],
                    "heldout_nll": k["heldout_nll"],
                    "heldout_bpb": k["heldout_nll"] / LN2,
                    "delta_vs_all_f": k.get("delta_vs_all_f"),
                    "delta_vs_all_f_se": k.get("delta_vs_all_f_se"),
                    "indexer_work_removed": k["indexer_work_removed"],
                }
            )
    return rows


def overlap_rows(matrix: torch.Tensor) -> list[dict]:
    """The [N, N] top-k overlap matrix as rows {layer_i, layer_j, overlap}."""
    n = matrix.shape[0]
    return [{"layer_i": i, "layer_j": j, "overlap": float(matrix[i, j])} for i in range(n) for j in range(n)]


def overlap_heatmap(matrix: torch.Tensor, path: str, title: str = "top-k overlap |T_i ∩ T_j| / k") -> str:
    """Save the overlap matrix as a PNG heatmap at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.6 + 0.4 * n))
    im = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def adjacent_overlap(matrix: torch.Tensor) -> list[float]:
    """Overlap of each layer with the next one: [N - 1]."""
    return [float(matrix[i, i + 1]) for i in range(matrix.shape[0] - 1)]
