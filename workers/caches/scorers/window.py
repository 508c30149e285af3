"""Windowed attention: what each key receives from the last ``cfg.window`` queries only.

SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024):
the observation window at the end of the prompt covers the question, so the score asks "what does
the question look at", not "what is looked at on average". SnapKV's pooling over neighbouring keys
is ``ScoreConfig.pool``, applied on top of any attention scorer.
"""

from __future__ import annotations

import torch

from kernels import attention_received
from workers.caches.scorers import register
from workers.caches.scorers.base import AttentionScorer


@register
class WindowScorer(AttentionScorer):
    """Attention received from the newest `cfg.window` queries of each forward."""

    name = "window"

    def received(self, cfg, q, k, q_pos, k_pos) -> torch.Tensor:
        """q [B, T, H, Dh], k [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, S] fp32."""
        return attention_received(q[:, -cfg.window :], k, q_pos[:, -cfg.window :], k_pos, chunk=cfg.chunk)
