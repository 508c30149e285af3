"""Random: a fixed pseudo-random score per (seed, layer, position) -- a control, not a method.

What any scorer must beat: with the same budget and the same sinks, a method that loses to
random eviction has learned nothing about which tokens matter.
"""

from __future__ import annotations

import torch

from workers.caches.scorers import register
from workers.caches.scorers.base import PositionScorer


@register
class RandomScorer(PositionScorer):
    """Hashes (cfg.seed, layer, position): a token keeps its score across forwards, and the draw
    does not depend on how the sequence was chunked."""

    name = "random"

    def static(self, cfg, layer, pos) -> torch.Tensor:
        """pos [B, S] -> [B, S] fp32 in [0, 1]."""
        salt = (cfg.seed * 1000003 + layer) * 1442695040888963407
        salt = (salt + 2**63) % 2**64 - 2**63  # wrapped to int64 as tensor arithmetic would (layer >= 7 overflowed)
        h = pos.long() * 6364136223846793005 + salt
        h = (h ^ (h >> 29)) * 0x5851F42D4C957F2D
        return ((h >> 33) & 0xFFFFFF).float() / float(0xFFFFFF)
