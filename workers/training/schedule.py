"""What an optimizer step does as a function of its index: its learning rate, its loss and attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.model.config import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_frac`` at ``steps``."""

    lr: float
    steps: int
    warmup_steps: int
    min_lr_frac: float

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr!r}: must be > 0")
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps!r}: must be >= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r}: must be >= 0")
        if not 0 <= self.min_lr_frac <= 1:
            raise ConfigError(f"min_lr_frac={self.min_lr_frac!r}: must be in [0, 1]")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass(frozen=True)
class Objective:
    """The loss of a step: LM cross-entropy + router aux loss + ``indexer_loss_weight`` * indexer KL.

    DSA models (``indexer``) attend densely for the first ``dense_warmup_steps`` (the indexer learns
    from the dense distribution; its input is detached inside the model), sparsely afterwards.
    """

    indexer: bool = False
    dense_warmup_steps: int = 0
    indexer_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.dense_warmup_steps < 0:
            raise ConfigError(f"dense_warmup_steps={self.dense_warmup_steps!r}: must be >= 0")

    def attn_at(self, step: int) -> str:
        return "sparse" if self.indexer and step >= self.dense_warmup_steps else "dense"
