"""Per-request KV caches for a deployment, chosen from its calibration.

No calibration: the model's full-precision ``DynamicCache``. A KV precision map and/or PrefixKV
budgets: the composed cache (serve.composed_cache), which evicts on full-precision keys and
values first and quantizes what it keeps.
"""

from __future__ import annotations

from collections.abc import Callable

from serve.calibration import Calibration
from workers.model.cache import DynamicCache


def cache_factory(cfg, cal: Calibration) -> Callable[[], object]:
    """cfg: ModelConfig (or an HF config view with n_layers) -> () -> a fresh empty cache for one request."""
    if cal.kv is None and cal.evict is None:
        return lambda: DynamicCache(cfg.n_layers)
    from serve.composed_cache import ComposedCache, ComposedSpec

    spec = ComposedSpec.from_calibration(cfg, cal)
    return lambda: ComposedCache(spec)
