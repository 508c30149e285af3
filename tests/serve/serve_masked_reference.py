"""A slow reference for workers.caches.composed: the same rules, applied with masks.

Every token ever written stays in a full-precision store; per layer, boolean masks say which
tokens are still held (`alive`) and which sit in a quantized block (`quant`, with their
fake-quantized values). The view gathers the alive tokens, substituting fake-quantized values.
Nothing is compacted or packed, so a bug in the composed cache's bookkeeping (which tokens a
block holds, which window token is evicted, which indexer key follows which token) shows up
as a difference.
"""

from __future__ import annotations

import torch

from kernels.kv_quant import fake_quantize
from workers.caches.composed import FULL_BITS, ComposedSpec, decode_cap, plan_prefill_counts
from workers.caches.protocol import KVView
from workers.caches.scoring import received, static_scores


class MaskedReferenceCache:
    def __init__(self, spec: ComposedSpec) -> None:
        self.spec = spec
        L = spec.n_layers
        self.k = [None] * L  # [1, N, Hkv, Dh] every token ever written
        self.v = [None] * L
        self.kq = [None] * L  # fake-quantized values where quant is set
        self.vq = [None] * L
        self.pos = [None] * L  # [1, N]
        self.idx = [None] * L
        self.alive = [None] * L  # [N] bool
        self.quant = [None] * L  # [N] bool
        self.score = [None] * L  # [N] fp32
        self.seen = [0] * L
        self.pending = [0] * L
        self.counts = None
        self.prefill_len = None

    def _append(self, lst, layer, t):
        lst[layer] = t if lst[layer] is None else torch.cat([lst[layer], t], 1)

    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        assert k.shape[0] == 1, "reference handles one sequence"
        T = k.shape[1]
        for lst, t in ((self.k, k), (self.v, v), (self.kq, k.clone()), (self.vq, v.clone()), (self.pos, pos)):
            self._append(lst, layer, t)
        if idx_k is not None:
            self._append(self.idx, layer, idx_k)
        for lst, t in ((self.alive, torch.ones(T, dtype=torch.bool)), (self.quant, torch.zeros(T, dtype=torch.bool))):
            lst[layer] = t if lst[layer] is None else torch.cat([lst[layer], t])
        s = static_scores(self.spec.score, layer, pos)[0]
        self.score[layer] = s if self.score[layer] is None else torch.cat([self.score[layer], s])
        if self.spec.evicts:
            self.pending[layer] = T
            return self._view(layer)
        before = self._view(layer)  # prefill="full": this forward sees its own tokens unquantized
        self._flush(layer)
        return before if self.spec.prefill == "full" else self._view(layer)

    def _view(self, layer) -> KVView:
        keep = self.alive[layer].nonzero()[:, 0]
        q = self.quant[layer][keep][None, :, None, None]
        k = torch.where(q, self.kq[layer][:, keep], self.k[layer][:, keep])
        v = torch.where(q, self.vq[layer][:, keep], self.v[layer][:, keep])
        idx = None if self.idx[layer] is None else self.idx[layer][:, keep]
        return KVView(k, v, self.pos[layer][:, keep], idx)

    def observe(self, layer, q, k, q_pos, k_pos) -> None:
        if not self.spec.evicts:
            return
        n_new, self.pending[layer] = self.pending[layer], 0
        keep = self.alive[layer].nonzero()[:, 0]
        if self.spec.score.uses_attention:
            self.score[layer][keep] += received(self.spec.score, q, k, q_pos, k_pos)[0]
        first = self.seen[layer] == 0
        self.seen[layer] += n_new
        if first:
            if self.counts is None:
                self.counts, self.prefill_len = plan_prefill_counts(self.spec, n_new), n_new
            target = self.counts[layer]
        else:
            target = decode_cap(self.spec, self.counts[layer], self.prefill_len, self.seen[layer])
        pos = self.pos[layer][0]
        alive, quant = self.alive[layer], self.quant[layer]
        newest = pos[alive].max()
        cand = (alive & ~quant & (pos >= self.spec.n_sink) & (pos != newest)).nonzero()[:, 0].tolist()
        excess = min(int(alive.sum()) - target, len(cand))
        # Evict the lowest scores; among equal scores the later token goes first.
        for i in sorted(cand, key=lambda i: (float(self.score[layer][i]), -i))[: max(excess, 0)]:
            alive[i] = False
        self._flush(layer)

    def _flush(self, layer) -> None:
        s = self.spec
        if not s.quantizes:
            return
        window = (self.alive[layer] & ~self.quant[layer]).nonzero()[:, 0]
        f = ((len(window) - s.residual) // s.block) * s.block
        if f <= 0:
            return
        blk = window[:f]
        for store, src, bits, role in (
            (self.kq, self.k, s.k_bits[layer], "k"),
            (self.vq, self.v, s.v_bits[layer], "v"),
        ):
            x = src[layer][:, blk]
            store[layer][:, blk] = x if bits == FULL_BITS else fake_quantize(x, bits, s.mode, role, s.group)
        self.quant[layer][blk] = True

    def length(self, layer: int) -> int:
        return 0 if self.alive[layer] is None else len(self.alive[layer])

    def kept(self, layer: int) -> int:
        return int(self.alive[layer].sum())

    def nbytes(self) -> int:
        return 0
