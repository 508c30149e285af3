"""KV-cache memory admission: a replica's requests together hold at most a byte budget of KV cache.

Each request reserves, when it is admitted, the bytes its cache will hold at its longest
(prompt + max_tokens tokens) and gives them back when it ends; a waiting request is admitted
when its reservation fits beside the running ones (first come, first served: a large request is
not overtaken by smaller ones behind it). So at the same budget a deployment whose cache holds
fewer bytes per token (a KVTuner precision map, PrefixKV budgets, or both) runs more sequences at
once, which is how its memory saving becomes throughput.

A reservation is measured, not modelled: the deployment's own cache type is given random tokens
of the model's shape, layer by layer, as a model's forward would, and asked for ``nbytes()`` (so
packing, scales, the full-precision window, eviction plans and indexer keys count exactly as the
cache stores them, with no second copy of those rules here). What a cache holds at n tokens
depends on how it got there (a quantized cache's full-precision window cycles between R and R+G-1
tokens during decode), so the measurement prefills n - `bucket` tokens, decodes one token at a
time to n + `bucket`, and keeps the most it held: an upper bound for any request of at most n
tokens while a block G <= `bucket`, at most `bucket` tokens' bytes above it. Lengths are rounded
up to the bucket and memoized, so a replica measures each bucket once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.caches.protocol import observer_for


@dataclass(frozen=True)
class KVShape:
    """What one token stores per layer: Hkv key/value heads of Dh, Di indexer dims (0 = no indexer)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    indexer_dim: int = 0

    @classmethod
    def of(cls, cfg, dtype: torch.dtype) -> KVShape:
        """cfg: ModelConfig or HFConfigView."""
        idx = getattr(cfg, "indexer", None)
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dtype, idx.head_dim if idx is not None else 0)


class KVReservations:
    """n tokens -> the bytes one request's cache holds at n tokens (rounded up to `bucket` tokens)."""

    def __init__(self, cache_factory: Callable[[], object], shape: KVShape, bucket: int = 64) -> None:
        if bucket < 1:
            raise ValueError(f"bucket={bucket!r}: must be >= 1")
        self.cache_factory = cache_factory
        self.shape = shape
        self.bucket = bucket
        self._memo: dict[int, int] = {}
        self._lock = threading.Lock()  # measured from worker threads

    def __call__(self, n_tokens: int) -> int:
        n = self.bucket * math.ceil(max(n_tokens, 1) / self.bucket)
        with self._lock:
            if n not in self._memo:
                self._memo[n] = self._measure(n)
            return self._memo[n]

    @torch.inference_mode()
    def _measure(self, n: int) -> int:
        cache, g = self.cache_factory(), torch.Generator().manual_seed(0)
        prefill = max(n - self.bucket, 1)
        self._forward(cache, 0, prefill, g)
        most = int(cache.nbytes())
        for p in range(prefill, n + self.bucket):
            self._forward(cache, p, 1, g)
            most = max(most, int(cache.nbytes()))
        return most

    def _forward(self, cache, start: int, t: int, g: torch.Generator) -> None:
        """What a model's forward of t tokens at positions start.. does to a cache: update each layer,
        then the observer hook with this forward's queries (for caches that score keys)."""
        s = self.shape
        pos = torch.arange(start, start + t)[None]  # [1, t]
        observe = observer_for(cache)
        for layer in range(s.n_layers):
            k, v, q = (torch.randn(1, t, s.n_kv_heads, s.head_dim, generator=g).to(s.dtype) for _ in range(3))
            idx = torch.randn(1, t, s.indexer_dim, generator=g).to(s.dtype) if s.indexer_dim else None
            view = cache.update(layer, k, v, pos, idx)
            if observe is not None:
                observe(layer, q, view.k, pos, view.pos)
