"""What a scorer implements: the attention a key receives, or a score fixed by its position.

Shape legend: B batch, T queries of this forward, S keys visible to them, H query heads,
Hkv key/value heads, Dh head dim.

An evicting cache (workers.caches.evicting, workers.caches.composed) keeps per key a score and
evicts the lowest. A position scorer's ``static`` score is stored once, when the token is written;
an attention scorer's keys start at 0 and gain ``received`` at every forward (summed over forwards,
as H2O accumulates during decoding). ``cfg`` is the ScoreConfig that chose the scorer: the
settings (window, seed, chunk) a scorer reads. Pooling over neighbouring keys is applied on top
of any attention scorer (workers.caches.scoring.received).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from workers.caches.scoring import ScoreConfig


class AttentionScorer:
    """Scored by attention: ``received`` from each forward's queries, summed over forwards."""

    name: ClassVar[str]
    uses_attention: ClassVar[bool] = True

    def received(
        self, cfg: ScoreConfig, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        """q [B, T, H, Dh], k [B, S, Hkv, Dh] (detached), q_pos [B, T], k_pos [B, S] -> [B, S] fp32."""
        raise NotImplementedError


class PositionScorer:
    """Scored without attention: ``static`` is fixed when a token enters and never changes."""

    name: ClassVar[str]
    uses_attention: ClassVar[bool] = False

    def static(self, cfg: ScoreConfig, layer: int, pos: torch.Tensor) -> torch.Tensor:
        """pos [B, S] true positions -> [B, S] fp32; must not depend on how the sequence was chunked."""
        raise NotImplementedError
