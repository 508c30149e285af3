"""How PrefixKV and its baselines score cached tokens.

Shape legend: B batch, T queries of this forward, S keys visible to them, H query heads,
Hkv key/value heads, Dh head dim.

Modes:
- "sum":     attention each key receives, summed over all queries of the forward, averaged over
             heads (the PrefixKV paper's importance; H2O's accumulated score during decode).
- "window":  the same, from the last `window` queries only (SnapKV's observation window): when
             the question sits at the end of the prompt, the window covers it, so the score
             asks "what does the question look at", not "what is looked at on average".
- pooling (``pool`` > 1, either attention mode): each key's score is averaged with its
             neighbours' (SnapKV's score pooling), so a key next to one the queries need is kept
             with it -- a record's value bytes travel with the byte the question points at.
- "recency": the key's position (keep the most recent tokens; StreamingLLM-style with sinks).
- "random":  a fixed random score per (seed, layer, position) -- a control, not a method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import attention_received

SCORE_MODES = ("sum", "window", "recency", "random")


@dataclass(frozen=True)
class ScoreConfig:
    """mode: one of SCORE_MODES; window: queries in the observation window ("window" mode);
    seed: for "random"; chunk: query chunk for attention_received (None = kernel default);
    pool: odd width of the average over neighbouring keys (1 = no pooling)."""

    mode: str = "sum"
    window: int = 32
    seed: int = 0
    chunk: int | None = None
    pool: int = 1

    def __post_init__(self):
        if self.mode not in SCORE_MODES:
            raise ValueError(f"score mode {self.mode!r} is not one of {SCORE_MODES}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"score window must be an int >= 1, got {self.window!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"score chunk must be None or an int >= 1, got {self.chunk!r}")
        if not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"score pool must be an odd int >= 1, got {self.pool!r}")

    @property
    def uses_attention(self) -> bool:
        return self.mode in ("sum", "window")


def received(
    cfg: ScoreConfig, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """Attention received by each key from this forward's scoring queries.

    q [B, T, H, Dh], k [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, S] fp32.
    """
    if cfg.mode == "window":
        q, q_pos = q[:, -cfg.window :], q_pos[:, -cfg.window :]
    r = attention_received(q.detach(), k.detach(), q_pos, k_pos, chunk=cfg.chunk)
    if cfg.pool > 1:  # over the keys as stored (original order; evicted neighbours are gone)
        r = F.avg_pool1d(r[:, None], cfg.pool, stride=1, padding=cfg.pool // 2, count_include_pad=False)[:, 0]
    return r


def static_scores(cfg: ScoreConfig, layer: int, pos: torch.Tensor) -> torch.Tensor:
    """Scores that do not depend on attention, fixed when a token enters: pos [B, S] -> [B, S].

    "random" hashes (seed, layer, position) so a token keeps its score across forwards and the
    draw does not depend on how the sequence was chunked.
    """
    if cfg.mode == "recency":
        return pos.float()
    if cfg.mode == "random":
        h = pos.long() * 6364136223846793005 + (cfg.seed * 1000003 + layer) * 1442695040888963407
        h = (h ^ (h >> 29)) * 0x5851F42D4C957F2D
        return ((h >> 33) & 0xFFFFFF).float() / float(0xFFFFFF)
    return torch.zeros_like(pos, dtype=torch.float32)
