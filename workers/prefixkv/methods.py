"""The cache-compression methods PrefixKV is compared with, as cache factories for workers.eval.

    m = Method("prefixkv", ratio=0.2, score=ScoreConfig("window", window=16), calibrated=cfg)
    continuation_nll(model, ctx, cont, make_cache=m.make_cache, observer=m.observer)

| name              | per-layer budget                             | token score          |
| ----------------- | -------------------------------------------- | -------------------- |
| full              | everything (DynamicCache)                    | -                    |
| prefixkv          | calibrated fractions f_l(r) (prefixkv.json)  | `score` (attention)  |
| uniform           | r in every layer (SnapKV/H2O-style)          | `score` (attention)  |
| pyramid           | fixed linear PyramidKV schedule, mean r      | `score` (attention)  |
| a position scorer | r in every layer                             | that scorer          |

The budget schedules are tuning.prefixkv.plan.SCHEDULES; every position scorer of the registry
(workers.caches.scorers: "recency", "random", any plug-in) is a method of its own, under its own
name. Every method spends the same number of tokens at the same ratio (tuning.prefixkv.plan),
sinks and the newest token included.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tuning.prefixkv.plan import SCHEDULES, schedule_fractions
from tuning.prefixkv.search import validate_ratio
from workers.caches import scorers
from workers.caches.evicting import EvictingCache
from workers.caches.protocol import DynamicCache
from workers.caches.scoring import ScoreConfig


def method_names() -> tuple[str, ...]:
    """full, the budget schedules, then every registered position scorer."""
    return ("full", *SCHEDULES, *scorers.names(attention=False))


def method_label(name: str, mode: str) -> str:
    """How results name a method: a schedule carries its score ("uniform-window"); the others do not."""
    return f"{name}-{mode}" if name in SCHEDULES else name


@dataclass
class Method:
    """A named compression method at one keep ratio; `make_cache` builds a fresh cache per batch
    and `observer` forwards the model's observer calls to the cache built last."""

    name: str
    ratio: float = 1.0
    n_layers: int = 0
    score: ScoreConfig = field(default_factory=ScoreConfig)
    n_sink: int = 4
    calibrated: dict | None = None  # {ratio: [L] fractions} for "prefixkv"

    def __post_init__(self):
        if self.name not in method_names():
            raise ValueError(f"method {self.name!r} is not one of {method_names()}")
        self.ratio = validate_ratio(self.ratio)
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"method {self.name!r} needs n_layers >= 1, got {self.n_layers!r}")
        if self.name in SCHEDULES and not self.score.uses_attention:
            raise ValueError(f"method {self.name!r} needs an attention score, one of {scorers.names(attention=True)}")
        if self.name not in ("full", *SCHEDULES):  # a position scorer: its own score, a uniform budget
            self.score = replace(self.score, mode=self.name)
        self.fractions = None if self.name == "full" else self._fractions()
        self.cache = None

    def _fractions(self) -> np.ndarray:
        """[L] keep fractions of the method's schedule at `ratio`."""
        schedule = self.name if self.name in SCHEDULES else "uniform"
        return schedule_fractions(schedule, self.ratio, self.n_layers, self.calibrated)

    @property
    def label(self) -> str:
        return method_label(self.name, self.score.mode)

    def make_cache(self):
        if self.fractions is None:
            self.cache = DynamicCache(self.n_layers)
        else:
            self.cache = EvictingCache(self.n_layers, self.fractions, self.ratio, self.n_sink, self.score)
        return self.cache

    def observer(self, layer, q, k, q_pos, k_pos) -> None:
        if isinstance(self.cache, EvictingCache):
            self.cache.observe(layer, q, k, q_pos, k_pos)

    def forward_kwargs(self) -> dict:
        """Keyword arguments for workers.eval functions: the cache factory and the observer."""
        return {"make_cache": self.make_cache, "observer": self.observer}
