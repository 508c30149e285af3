"""KVTuner quantized KV caches: fake-quant (search) and packed (serving) with identical numerics."""

from workers.kvcache.cache import CACHE_KINDS, FakeQuantCache, PackedKVCache, make_cache
from workers.kvcache.config import KVQuantConfig, parse_map

__all__ = ["CACHE_KINDS", "FakeQuantCache", "KVQuantConfig", "PackedKVCache", "make_cache", "parse_map"]
