"""Per-request KV caches for a deployment, chosen from its calibration.

No calibration: the model's full-precision ``DynamicCache``. A KV precision map and/or PrefixKV
budgets: the composed cache (workers.caches.composed), which evicts on full-precision keys and
values first and quantizes what it keeps.
"""

from __future__ import annotations

from collections.abc import Callable

from serve.calibration import Calibration
from workers.caches.composed import ComposedCache, ComposedSpec
from workers.caches.protocol import DynamicCache
from workers.caches.scoring import ScoreConfig


def cache_factory(cfg, cal: Calibration) -> Callable[[], object]:
    """cfg: ModelConfig (or an HF config view with n_layers) -> () -> a fresh empty cache for one request."""
    if cal.kv is None and cal.evict is None:
        return lambda: DynamicCache(cfg.n_layers)
    spec = composed_spec(cfg, cal)
    return lambda: ComposedCache(spec)


def composed_spec(cfg, cal: Calibration, score: ScoreConfig | None = None) -> ComposedSpec:
    """The composed cache's settings from a deployment's calibration (KV precision and/or PrefixKV budgets)."""
    kw: dict = {"n_layers": cfg.n_layers}
    if cal.kv:
        kw.update(
            k_bits=tuple(cal.kv["k_bits"]),
            v_bits=tuple(cal.kv["v_bits"]),
            mode=cal.kv["mode"],
            group=cal.kv["group"],
            residual=cal.kv["residual"],
            prefill=cal.kv.get("prefill", "full"),
        )
    if cal.evict:
        kw.update(
            fractions=tuple(cal.evict["fractions"]), keep_ratio=cal.evict["keep_ratio"], n_sink=cal.evict["n_sink"]
        )
        score = score or ScoreConfig(
            cal.evict.get("score", "sum"), window=cal.evict.get("window", 32), pool=cal.evict.get("pool", 1)
        )
    return ComposedSpec(**kw, score=score or ScoreConfig("sum"))
