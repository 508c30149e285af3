"""Summed attention: what each key receives from every query of the forward, averaged over heads.

H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023) accumulates it over decoding steps; PrefixKV (Wang et al., "PrefixKV: Adaptive
Prefix KV Cache is What Vision Instruction-Following Models Need for Efficient Generation", 2024)
calls it a prompt token's importance and calibrates per-layer budgets on it.
"""

from __future__ import annotations

import torch

from kernels import attention_received
from workers.caches.scorers import register
from workers.caches.scorers.base import AttentionScorer


@register
class SumScorer(AttentionScorer):
    """Attention received from all queries (computed in query chunks: never an [T, S] map per head)."""

    name = "sum"

    def received(self, cfg, q, k, q_pos, k_pos) -> torch.Tensor:
        """q [B, T, H, Dh], k [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, S] fp32."""
        return attention_received(q, k, q_pos, k_pos, chunk=cfg.chunk)
