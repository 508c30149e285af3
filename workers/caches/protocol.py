"""The KV-cache protocol every cache implements, and the full-precision ``DynamicCache``.

A cache is asked once per attention layer per forward:
``update(layer, k, v, pos, idx_k) -> KVView`` with the new tokens' keys/values
(k, v: [B, T, Hkv, Dh], keys after RoPE), their true positions ``pos`` [B, T] and, for
layers that run a DSA indexer, their indexer keys ``idx_k`` [B, T, Di]. It returns every
key the new queries may attend to, new tokens included, with positions [B, S]; causality
is decided by positions, so caches that evict tokens (PrefixKV) or store them quantized
(KVTuner) implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.caches import CACHES


@dataclass
class KVView:
    k: torch.Tensor  # [B, S, Hkv, Dh]
    v: torch.Tensor  # [B, S, Hkv, Dh]
    pos: torch.Tensor  # [B, S] long, -1 = empty slot
    idx_k: torch.Tensor | None = None  # [B, S, Di]

    def nbytes(self) -> int:
        """Bytes held by keys, values and indexer keys."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.idx_k) if t is not None)


def appended(old: KVView | None, k, v, pos, idx_k=None) -> KVView:
    """``old`` (None = empty) with new tokens k, v [B, T, Hkv, Dh], pos [B, T], idx_k [B, T, Di] appended."""
    if old is None:
        return KVView(k, v, pos, idx_k)
    return KVView(
        torch.cat([old.k, k], 1),
        torch.cat([old.v, v], 1),
        torch.cat([old.pos, pos], 1),
        None if idx_k is None or old.idx_k is None else torch.cat([old.idx_k, idx_k], 1),
    )


def observer_for(cache):
    """The observer hook to give a forward over `cache` (``model(..., observer=...)``), or None.

    A cache that scores keys by the attention they receive (eviction) defines ``observe``; one that
    may or may not, depending on its settings (ComposedCache, BatchCache), also says whether it does
    (``observes``). Giving no observer where none is needed matters: with one, attention reads the
    view's keys as tensors, so a packed cache is dequantized every step instead of attending its
    codes (workers.caches.packed_view)."""
    observe = getattr(cache, "observe", None)
    return observe if observe is not None and getattr(cache, "observes", True) else None


class KVCacheProtocol(Protocol):
    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: torch.Tensor,
        idx_k: torch.Tensor | None = None,
    ) -> KVView: ...

    def length(self, layer: int) -> int: ...

    def nbytes(self) -> int: ...


@CACHES.register
class DynamicCache:
    """Full-precision cache that grows by concatenation (the reference every other cache is compared to)."""

    name = "full"

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.layers: list[KVView | None] = [None] * n_layers

    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        view = appended(self.layers[layer], k, v, pos, idx_k)
        self.layers[layer] = view
        return view

    def length(self, layer: int) -> int:
        view = self.layers[layer]
        return 0 if view is None else view.k.shape[1]

    def nbytes(self) -> int:
        return sum(view.nbytes() for view in self.layers if view is not None)
