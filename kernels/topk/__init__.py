"""Deterministic top-k with -1 padding (DSA model). See reference.py for the ordering rules."""

from __future__ import annotations

import torch

from kernels._dispatch import check, triton_module, use_triton
from kernels.topk.reference import topk_indices as topk_indices_reference

__all__ = ["topk_indices", "topk_indices_reference"]


def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [B, T, S] -> [B, T, K] int64: descending score, ties lowest index, -1 padding."""
    check(logits.dim() == 3, f"topk_indices: logits must be [B, T, S], got shape {tuple(logits.shape)}")
    check(isinstance(k, int) and k >= 1, f"topk_indices: k must be a positive int, got {k!r}")
    if use_triton(logits):
        return triton_module("topk").topk_indices(logits, k)
    return topk_indices_reference(logits, k)
