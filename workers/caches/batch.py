"""One decode step over many requests, each with its own cache.

``BatchCache`` implements the KV-cache protocol for a batch of B requests by forwarding row b
to request b's own cache (any implementation: full precision, packed, evicting, composed) and
stacking the views, right-padded to the longest with position -1. The model masks keys by
position (``k_pos >= 0`` and causality), so padding is invisible to attention and to the
indexer, and per-request caches may hold different numbers of tokens per layer.

When a row's view can attend its own storage (packed caches, workers.caches.packed_view), a decode
step attends row by row and nothing is stacked: stacking copies every row's cache on every step,
and a packed row would have to be dequantized first.
"""

from __future__ import annotations

from functools import cached_property

import torch

from kernels.decode_attention import decode_attention_dense, has_fast_path
from workers.caches.protocol import KVView, observer_for


def _pad(t: torch.Tensor, length: int, value: float | int) -> torch.Tensor:
    """Right-pad dim 1 of t [1, S, ...] to length."""
    if t.shape[1] == length:
        return t
    shape = (t.shape[0], length - t.shape[1], *t.shape[2:])
    return torch.cat([t, t.new_full(shape, value)], 1)


def _stacked(views: list) -> KVView:
    """Row views, right-padded to the longest and stacked: k, v [B, S, Hkv, Dh], pos [B, S]."""
    S = max(view.pos.shape[1] for view in views)
    has_idx = all(view.idx_k is not None for view in views)
    return KVView(
        torch.cat([_pad(view.k, S, 0.0) for view in views], 0),
        torch.cat([_pad(view.v, S, 0.0) for view in views], 0),
        torch.cat([_pad(view.pos, S, -1) for view in views], 0),
        torch.cat([_pad(view.idx_k, S, 0.0) for view in views], 0) if has_idx else None,
    )


class _RowsView:
    """The batch's view as its rows' own: stacked (k, v, idx_k) only when read as tensors."""

    def __init__(self, views: list) -> None:
        self.views = views
        S = max(view.pos.shape[1] for view in views)
        self.pos = torch.cat([_pad(view.pos, S, -1) for view in views], 0)  # [B, S]

    @cached_property
    def _tensors(self) -> KVView:
        return _stacked(self.views)

    k = property(lambda self: self._tensors.k)
    v = property(lambda self: self._tensors.v)
    idx_k = property(lambda self: self._tensors.idx_k)

    def fused_attend(self, q: torch.Tensor, q_pos: torch.Tensor, scale: float | None = None) -> torch.Tensor | None:
        """q [B, 1, H, Dh], q_pos [B, 1] -> [B, 1, H, Dh], each row against its own cache (a packed row
        from its codes, a full-precision one directly); None off the fast path, as PackedKVView."""
        if q.shape[1] != 1 or not has_fast_path(q):
            return None
        outs = []
        for b, view in enumerate(self.views):
            qb, pb = q[b : b + 1], q_pos[b : b + 1]
            if hasattr(view, "fused_attend"):
                outs.append(view.fused_attend(qb, pb, scale))
            else:
                outs.append(decode_attention_dense(qb, view.k, view.v, view.pos, pb, scale))
        return torch.cat(outs, 0)


class BatchCache:
    """Caches of B requests seen as one batch: update(layer, k [B,T,Hkv,Dh], ...) -> KVView [B,S,...]."""

    def __init__(self, caches: list, new_tokens: list[int] | None = None) -> None:
        """new_tokens[b]: how many of the T new tokens of row b are real (batched prefill of
        right-padded prompts); the padding is never written to a cache nor shown to an observer."""
        if not caches:
            raise ValueError("BatchCache needs at least one cache")
        self.caches = caches
        self.new_tokens = new_tokens
        self._lengths: dict[int, list[int]] = {}  # per layer: each row's own S in the last view

    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        n = self.new_tokens or [k.shape[1]] * len(self.caches)
        views = [
            c.update(
                layer,
                k[b : b + 1, : n[b]],
                v[b : b + 1, : n[b]],
                pos[b : b + 1, : n[b]],
                None if idx_k is None else idx_k[b : b + 1, : n[b]],
            )
            for b, c in enumerate(self.caches)
        ]
        self._lengths[layer] = [view.pos.shape[1] for view in views]
        if len(views) == 1 and views[0].pos.shape[1] >= k.shape[1]:
            return views[0]
        if any(hasattr(view, "fused_attend") for view in views):
            return _RowsView(views)
        return _stacked(views)

    @property
    def observes(self) -> bool:
        return any(observer_for(c) is not None for c in self.caches)

    def observe(self, layer, q, k, q_pos, k_pos) -> None:
        """Observer hook: hand each row (its keys without padding) to its own cache's observe."""
        t = self.new_tokens or [q.shape[1]] * len(self.caches)
        for b, (c, n) in enumerate(zip(self.caches, self._lengths[layer])):
            c.observe(layer, q[b : b + 1, : t[b]], k[b : b + 1, :n], q_pos[b : b + 1, : t[b]], k_pos[b : b + 1, :n])

    def length(self, layer: int) -> int:
        return max(c.length(layer) for c in self.caches)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)
