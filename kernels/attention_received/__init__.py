"""Attention each key receives, summed over queries and averaged over heads (PrefixKV)."""

from __future__ import annotations

import torch

from kernels._dispatch import check, triton_module, use_triton
from kernels.attention_received.reference import attention_received as attention_received_reference

__all__ = ["attention_received", "attention_received_reference"]


def attention_received(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """q [B, T, H, Dh], k [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, S] fp32.

    Causal by positions (key s visible to query t iff 0 <= k_pos <= q_pos), scale 1/sqrt(Dh).
    """
    check(q.dim() == 4, f"attention_received: q must be [B, T, H, Dh], got shape {tuple(q.shape)}")
    b, t, h, dh = q.shape
    check(
        k.dim() == 4 and k.shape[0] == b and k.shape[3] == dh and h % k.shape[2] == 0,
        f"attention_received: k must be [B={b}, S, Hkv | {h}, Dh={dh}], got shape {tuple(k.shape)}",
    )
    check(
        tuple(q_pos.shape) == (b, t),
        f"attention_received: q_pos must be [{b}, {t}], got {tuple(q_pos.shape)}",
    )
    check(
        tuple(k_pos.shape) == (b, k.shape[1]),
        f"attention_received: k_pos must be [{b}, {k.shape[1]}], got {tuple(k_pos.shape)}",
    )
    check(chunk is None or chunk >= 1, f"attention_received: chunk must be >= 1, got {chunk}")
    if use_triton(q):
        return triton_module("attention_received").attention_received(q, k, q_pos, k_pos)
    return attention_received_reference(q, k, q_pos, k_pos, chunk)
