"""Lightning-indexer logits (DSA model, IndexCache). See reference.py for the math."""

from __future__ import annotations

import torch

from kernels._dispatch import check, triton_module, use_triton
from kernels.indexer_logits.reference import indexer_logits as indexer_logits_reference

__all__ = ["indexer_logits", "indexer_logits_reference"]


def indexer_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """q [B, T, Hi, Di], k [B, S, Di], w [B, T, Hi], q_pos [B, T], k_pos [B, S] -> [B, T, S] fp32.

    I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s]); -inf where k_pos > q_pos or k_pos < 0.
    """
    check(q.dim() == 4, f"indexer_logits: q must be [B, T, Hi, Di], got shape {tuple(q.shape)}")
    b, t, hi, di = q.shape
    check(
        k.dim() == 3 and k.shape[0] == b and k.shape[2] == di,
        f"indexer_logits: k must be [B={b}, S, Di={di}], got shape {tuple(k.shape)}",
    )
    check(tuple(w.shape) == (b, t, hi), f"indexer_logits: w must be [{b}, {t}, {hi}], got {tuple(w.shape)}")
    check(tuple(q_pos.shape) == (b, t), f"indexer_logits: q_pos must be [{b}, {t}], got {tuple(q_pos.shape)}")
    check(
        tuple(k_pos.shape) == (b, k.shape[1]),
        f"indexer_logits: k_pos must be [{b}, {k.shape[1]}], got {tuple(k_pos.shape)}",
    )
    check(chunk is None or chunk >= 1, f"indexer_logits: chunk must be >= 1, got {chunk}")
    if use_triton(q):
        return triton_module("indexer_logits").indexer_logits(q, k, w, q_pos, k_pos)
    return indexer_logits_reference(q, k, w, q_pos, k_pos, chunk)
