"""Deterministic top-k over indexer logits, pure PyTorch (ground truth and CPU path).

Order: descending score, ties broken by the lowest index; entries that are -inf (masked) or
NaN are never selected, and a row with fewer than k finite candidates is padded with -1.
`torch.topk` does not promise an order among ties, so its result is repaired: the selected
entries are re-sorted by (score desc, index asc), and the rare rows whose k-th score is tied
with an unselected entry are redone with a stable full sort.
"""

from __future__ import annotations

import torch


def _stable_sort_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [R, S] -> [R, k] indices by (score desc, index asc) using a stable full sort."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [B, T, S] -> [B, T, K] int64 indices (K = k), -1 where fewer than k finite."""
    b, t, s = logits.shape
    x = logits.reshape(b * t, s).float()
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    kk = min(k, s)
    out = torch.full((b * t, k), -1, dtype=torch.int64, device=logits.device)
    if kk == 0 or b * t == 0:
        return out.view(b, t, k)
    vals, idx = torch.topk(x, kk, dim=-1, sorted=True)  # [R, kk]
    # Re-sort the selected set by (value desc, index asc): stable sort by index, then by value.
    idx, perm = idx.sort(dim=-1)
    vals = vals.gather(-1, perm)
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(-1, perm)
    # Boundary ties: the selected entries equal to the k-th score must be the lowest-indexed.
    thr = vals[:, -1:]
    finite_thr = torch.isfinite(thr).squeeze(-1)
    n_sel = (vals == thr).sum(-1)
    n_all = (x == thr).sum(-1)
    bad = finite_thr & (n_all > n_sel)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        idx[rows] = _stable_sort_rows(x[rows], kk)
        vals[rows] = x[rows].gather(-1, idx[rows])
    idx = idx.masked_fill(vals == float("-inf"), -1)
    out[:, :kk] = idx
    return out.view(b, t, k)
