"""How an evicting cache scores its tokens: the typed score setting, and the two calls caches make.

Shape legend: B batch, T queries of this forward, S keys visible to them, H query heads,
Hkv key/value heads, Dh head dim.

The scorer is chosen by name from the registry (workers.caches.scorers: "sum" H2O/PrefixKV,
"window" SnapKV, "recency" StreamingLLM, "random" a control, and any plug-in). Pooling
(``pool`` > 1, any attention scorer) averages each key's score with its neighbours' (SnapKV's
score pooling), so a key next to one the queries need is kept with it -- a record's value bytes
travel with the byte the question points at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.caches import scorers


@dataclass(frozen=True)
class ScoreConfig:
    """mode: a registered scorer name (scorers.names()); window: queries in the observation window
    ("window"); seed: of "random"; chunk: query chunk for attention_received (None = kernel default);
    pool: odd width of the average over neighbouring keys (1 = no pooling)."""

    mode: str = "sum"
    window: int = 32
    seed: int = 0
    chunk: int | None = None
    pool: int = 1

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in scorers.SCORERS:
            raise ValueError(f"score mode {self.mode!r} is not one of {scorers.names()}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"score window must be an int >= 1, got {self.window!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"score chunk must be None or an int >= 1, got {self.chunk!r}")
        if not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"score pool must be an odd int >= 1, got {self.pool!r}")

    @property
    def scorer(self):
        """The registered scorer of `mode`: an AttentionScorer or a PositionScorer (scorers.base)."""
        return scorers.get(self.mode)()

    @property
    def uses_attention(self) -> bool:
        return scorers.get(self.mode).uses_attention


def received(
    cfg: ScoreConfig, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """Attention received by each key from this forward's scoring queries (attention scorers only).

    q [B, T, H, Dh], k [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, S] fp32.
    """
    r = cfg.scorer.received(cfg, q.detach(), k.detach(), q_pos, k_pos)  # scores never carry gradients
    if cfg.pool > 1:  # over the keys as stored (original order; evicted neighbours are gone)
        r = F.avg_pool1d(r[:, None], cfg.pool, stride=1, padding=cfg.pool // 2, count_include_pad=False)[:, 0]
    return r


def static_scores(cfg: ScoreConfig, layer: int, pos: torch.Tensor) -> torch.Tensor:
    """A token's score when it enters: pos [B, S] -> [B, S] fp32 (0 for attention scorers, which
    then add `received` at every forward)."""
    if cfg.uses_attention:
        return torch.zeros_like(pos, dtype=torch.float32)
    return cfg.scorer.static(cfg, layer, pos)
