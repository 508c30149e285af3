"""Sparse attention over top-k indices (DSA model, training). See reference.py for semantics."""

from __future__ import annotations

import torch

from kernels._dispatch import check, triton_module, use_triton
from kernels.sparse_attention.reference import causal_attention, dense_masked_attention
from kernels.sparse_attention.reference import sparse_attention as sparse_attention_reference

__all__ = ["causal_attention", "dense_masked_attention", "sparse_attention", "sparse_attention_reference"]


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q [B, T, H, Dh], k [B, S, Hkv, Dh], v [B, S, Hkv, Dh], idx [B, T, K] -> [B, T, H, Dh].

    idx is shared by all heads; -1 entries are skipped; a query with no valid index gets zeros.
    """
    check(q.dim() == 4, f"sparse_attention: q must be [B, T, H, Dh], got shape {tuple(q.shape)}")
    b, t, h, dh = q.shape
    check(
        k.dim() == 4 and k.shape[0] == b and k.shape[3] == dh and h % k.shape[2] == 0,
        f"sparse_attention: k must be [B={b}, S, Hkv | {h}, Dh={dh}], got shape {tuple(k.shape)}",
    )
    check(v.shape == k.shape, f"sparse_attention: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    check(
        idx.dim() == 3 and tuple(idx.shape[:2]) == (b, t),
        f"sparse_attention: idx must be [{b}, {t}, K], got shape {tuple(idx.shape)}",
    )
    if use_triton(q):
        return triton_module("sparse_attention").sparse_attention(q, k, v, idx, scale)
    return sparse_attention_reference(q, k, v, idx, scale)
