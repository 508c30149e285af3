"""An evicting KV cache: per-layer token budgets after prefill, per-layer caps during decode.

    cache = EvictingCache.build(n_layers, fractions, ratio=0.2, n_sink=4, score=ScoreConfig("window"))
    model(context, cache=cache, observer=cache.observe)        # prefill; then each layer evicts
    model(continuation, cache=cache, observer=cache.observe)   # decode; each layer stays capped

Shape legend: B batch, T new tokens, S cached tokens, Hkv key/value heads, Dh head dim, Di indexer dim.

Implements the workers.caches.protocol protocol. The model calls `update` (store and return every
visible key) and then `observe` (the observer hook, called before attention with the same keys);
`observe` scores the keys and evicts from the *stored* layer, so the forward in flight still
attends to everything it was given and only later forwards see the compressed layer.

1. Prefill (the first forward a layer sees): layer l keeps exactly `counts[l]` tokens, planned
   from its keep fraction for the prompt length N with an exact total (tuning.prefixkv.plan).
2. Decode: layer l holds at most max(protected, round(f_l * seen)) tokens, f_l = counts[l] / N.
3. Kept tokens stay in original order with their true positions (keys are stored after RoPE,
   so attention needs nothing else); sink tokens (positions < n_sink) and the newest token are
   never evicted. Ties in score keep the earlier token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tuning.prefixkv.plan import plan_counts
from tuning.prefixkv.search import n_protected, validate_ratio
from workers.caches import CACHES
from workers.caches.protocol import KVView, appended
from workers.caches.scoring import ScoreConfig, received, static_scores


@CACHES.register
class EvictingCache:
    """Per-layer evicting cache (see module docstring)."""

    name = "evicting"

    def __init__(
        self,
        n_layers: int,
        fractions: Sequence[float],
        ratio: float,
        n_sink: int = 4,
        score: ScoreConfig | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        """fractions: [L] keep-fraction wishes (rescaled to the exact budget at prefill);
        counts: [L] explicit post-prefill counts, overriding the plan (tests, serving)."""
        self.ratio = validate_ratio(ratio)
        self.fractions = np.asarray(fractions, dtype=np.float64).reshape(-1)
        if self.fractions.shape != (n_layers,):
            raise ValueError(f"fractions has {self.fractions.shape[0]} entries, the model has {n_layers} layers")
        if not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {n_sink!r}")
        self.n_layers, self.n_sink = n_layers, n_sink
        self.score = score or ScoreConfig()
        self.fixed_counts = None if counts is None else [int(c) for c in counts]
        if self.fixed_counts is not None and len(self.fixed_counts) != n_layers:
            raise ValueError(f"counts has {len(self.fixed_counts)} entries, the model has {n_layers} layers")
        self.counts: list[int] | None = None  # planned at the first prefill
        self.prefill_len: int | None = None
        self.layers: list[KVView | None] = [None] * n_layers
        self.scores: list[torch.Tensor | None] = [None] * n_layers  # [B, S] fp32
        self.seen = [0] * n_layers
        self.pending = [0] * n_layers  # new tokens stored by update, not yet observed

    @classmethod
    def build(cls, n_layers: int, fractions, ratio: float, n_sink: int = 4, score=None) -> EvictingCache:
        return cls(n_layers, fractions, ratio, n_sink=n_sink, score=score)

    def forward_kwargs(self) -> dict:
        """`model(tokens, **cache.forward_kwargs())` wires both the cache and its observer."""
        return {"cache": self, "observer": self.observe}

    # -- protocol ---------------------------------------------------------------------------
    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        """k, v [B, T, Hkv, Dh], pos [B, T], idx_k [B, T, Di] | None -> everything visible."""
        if self.pending[layer]:
            raise RuntimeError(
                f"EvictingCache layer {layer}: the previous forward never called observe(); "
                "pass observer=cache.observe (or **cache.forward_kwargs()) to the model"
            )
        old, new_scores = self.layers[layer], static_scores(self.score, layer, pos)
        view = appended(old, k, v, pos, idx_k)
        scores = new_scores if old is None else torch.cat([self.scores[layer], new_scores], 1)
        self.layers[layer], self.scores[layer] = view, scores
        self.pending[layer] = k.shape[1]
        return view

    def observe(self, layer, q, k, q_pos, k_pos) -> None:
        """Observer hook: q [B, T, H, Dh], k [B, S, Hkv, Dh] (this layer's view), positions."""
        if self.pending[layer] == 0:
            raise RuntimeError(f"EvictingCache.observe(layer={layer}) without a preceding update")
        view = self.layers[layer]
        if k.shape[1] != view.k.shape[1]:
            raise RuntimeError(f"layer {layer}: observer saw {k.shape[1]} keys, the cache holds {view.k.shape[1]}")
        self._observed(layer, received(self.score, q, k, q_pos, k_pos) if self.score.uses_attention else None)

    def load_prefill(self, layer: int, kv: KVView, got: torch.Tensor | None) -> None:
        """Fill a fresh layer from a prefill run elsewhere: the state `update` + `observe` leave
        after that prefill forward, bit for bit. kv: the layer's full-precision keys and values
        [B, S, ...]; got [B, S]: the attention that forward's scoring queries gave each key
        (`scoring.received` under this cache's score; None for position scorers). Evicting never
        changes the prefill's own attention, so one prefill serves every budget (workers.eval)."""
        if self.seen[layer] or self.pending[layer]:
            raise RuntimeError(f"EvictingCache.load_prefill(layer={layer}) on a layer that already holds tokens")
        if self.score.uses_attention and got is None:
            raise ValueError(f"layer {layer}: scoring by {self.score.mode!r} needs the attention each key received")
        self.update(layer, kv.k, kv.v, kv.pos, kv.idx_k)
        self._observed(layer, got if self.score.uses_attention else None)

    def _observed(self, layer: int, got: torch.Tensor | None) -> None:
        """The new tokens of `layer` were attended (got [B, S]: attention they received, or None): evict."""
        n_new = self.pending[layer]
        if got is not None:
            self.scores[layer] = self.scores[layer] + got
        first = self.seen[layer] == 0
        self.seen[layer] += n_new
        self.pending[layer] = 0
        if first:
            self._plan(layer, n_new)
            target = self.counts[layer]
        else:
            frac = self.counts[layer] / self.prefill_len
            floor = n_protected(self.seen[layer], min(self.n_sink, self.seen[layer]))
            target = max(floor, int(np.floor(frac * self.seen[layer] + 0.5)))
        if self.layers[layer].k.shape[1] > target:
            self._evict(layer, target)

    def length(self, layer: int) -> int:
        """Tokens this layer has seen (the next position), not how many it still holds: models
        derive default positions from `length(0)`, and evicted tokens still advance them."""
        return self.seen[layer] + self.pending[layer]

    def kept(self, layer: int) -> int:
        """Tokens this layer still holds."""
        view = self.layers[layer]
        return 0 if view is None else view.k.shape[1]

    def nbytes(self) -> int:
        """Bytes of cached keys, values and indexer keys (what a serving cache must hold)."""
        return sum(view.nbytes() for view in self.layers if view is not None)

    def positions(self, layer: int) -> torch.Tensor:
        """[B, S] true positions this layer still holds, ascending."""
        return self.layers[layer].pos

    # -- internals ----------------------------------------------------------------------------
    def _plan(self, layer: int, n_tokens: int) -> None:
        if self.counts is None:
            if self.fixed_counts is not None:
                lo = n_protected(n_tokens, self.n_sink)
                bad = [c for c in self.fixed_counts if not lo <= c <= n_tokens]
                if bad:
                    raise ValueError(
                        f"planned counts {bad} are outside [{lo}, {n_tokens}] for a {n_tokens}-token prompt"
                    )
                self.counts = list(self.fixed_counts)
            else:
                self.counts = plan_counts(self.fractions, n_tokens, self.ratio, self.n_sink).tolist()
            self.prefill_len = n_tokens
        elif n_tokens != self.prefill_len:
            raise RuntimeError(f"layer {layer} prefilled {n_tokens} tokens, layer 0 prefilled {self.prefill_len}")

    def _evict(self, layer: int, target: int) -> None:
        """Keep the `target` best-scored tokens of every row, protected ones first, in order."""
        view, scores = self.layers[layer], self.scores[layer]
        pos = view.pos
        newest = pos.max(dim=1, keepdim=True).values
        protected = (pos < self.n_sink) | (pos == newest)
        key = torch.where(protected, torch.full_like(scores, float("inf")), scores)
        # Stable sort on the negated score: equal scores keep the earlier token.
        order = torch.sort(-key, dim=1, stable=True).indices[:, :target]
        keep = torch.sort(order, dim=1).values  # [B, target] original order

        def take(t):
            if t is None:
                return None
            idx = keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            return torch.gather(t, 1, idx)

        self.layers[layer] = KVView(take(view.k), take(view.v), take(view.pos), take(view.idx_k))
        self.scores[layer] = take(scores)
