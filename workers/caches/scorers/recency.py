"""Recency: the newest tokens score highest.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024):
keep the attention-sink tokens (the cache's ``n_sink``, always kept) and a window of the most
recent tokens. Needs no attention, so it runs under any attention implementation.
"""

from __future__ import annotations

import torch

from workers.caches.scorers import register
from workers.caches.scorers.base import PositionScorer


@register
class RecencyScorer(PositionScorer):
    """A token's score is its position."""

    name = "recency"

    def static(self, cfg, layer, pos) -> torch.Tensor:
        """pos [B, S] -> [B, S] fp32."""
        return pos.float()
