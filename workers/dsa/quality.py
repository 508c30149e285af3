"""Held-out quality of a converted model: dense attention, sparse with its own indexer, k random positions.

All three run the same frozen weights on the same windows, so their per-window NLLs pair; the
table gives each at every k and the paired differences (sparse - dense, random - dense,
sparse - random) with standard errors over windows.

Shape legend: R windows, L tokens per window (inputs; targets are the next L tokens).
"""

from __future__ import annotations

import torch

from workers.eval import token_nll
from workers.indexcache.report import paired


@torch.no_grad()
def window_nll(hf, windows: torch.Tensor, mode: str, topk: int | None = None, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token NLL (nats) per window under attention `mode`: windows [R, L + 1] -> [R] float64."""
    from workers.model.hf.lightning import attention_mode

    out = []
    with attention_mode(hf, mode, topk=topk):
        for i in range(0, windows.shape[0], batch_size):
            w = windows[i : i + batch_size]
            out.append(token_nll(hf(w[:, :-1]).logits, w[:, 1:]).double().mean(dim=1))
    return torch.cat(out)


def _pair(a: torch.Tensor, b: torch.Tensor) -> dict:
    p = paired(a, b)
    return {"mean": p.mean, "se": p.se, "n": p.n}


def quality_table(hf, windows: torch.Tensor, topks: list[int], batch_size: int = 4) -> dict:
    """{"dense": nll, "windows": R, "k": {k: {"sparse", "random", "sparse_minus_dense", "random_minus_dense",
    "sparse_minus_random"}}}: mean NLLs (nats/token) and paired differences (mean, se, n)."""
    dense = window_nll(hf, windows, "dense", batch_size=batch_size)
    table = {"dense": float(dense.mean()), "windows": int(windows.shape[0]), "k": {}}
    for k in topks:
        sparse = window_nll(hf, windows, "sparse", k, batch_size)
        rand = window_nll(hf, windows, "random", k, batch_size)
        table["k"][k] = {
            "sparse": float(sparse.mean()),
            "random": float(rand.mean()),
            "sparse_minus_dense": _pair(sparse, dense),
            "random_minus_dense": _pair(rand, dense),
            "sparse_minus_random": _pair(sparse, rand),
        }
    return table


def table_rows(table: dict) -> list[dict]:
    """The quality table as rows (one per k) for an MLflow table artifact."""
    rows = []
    for k, e in table["k"].items():
        rows.append(
            {
                "k": k,
                "dense": table["dense"],
                "sparse": e["sparse"],
                "random": e["random"],
                **{
                    f"{n}_{f}": e[n][f]
                    for n in ("sparse_minus_dense", "random_minus_dense", "sparse_minus_random")
                    for f in ("mean", "se")
                },
                "windows": table["windows"],
            }
        )
    return rows
