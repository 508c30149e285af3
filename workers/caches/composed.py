"""A serving cache that composes PrefixKV eviction with KVTuner quantization.

Shape legend: B batch, T new tokens, S visible keys, Hkv key/value heads, Dh head dim,
Di indexer head dim, R residual window, G quantization block (KIVI group; 1 per token).

Per layer the cache holds [quantized part | full-precision window]. The rules:
1. update(): new tokens join the window in full precision. Without eviction, whole blocks
   beyond the newest R window tokens are quantized at once (KVTuner's rule); the forward attends
   to its own tokens at full precision (`prefill="full"`, the default) or already quantized
   (`prefill="quantized"`), as workers.caches.quantized.PackedKVCache.
2. With eviction, observe() (called by the model before attention, with this forward's
   queries) adds the attention each key receives to its score, then evicts, then quantizes:
   prefill: the layer keeps exactly its planned count of prompt tokens (tuning.prefixkv.plan,
   as workers.prefixkv.EvictingCache), chosen on full-precision K/V, and only the kept tokens
   are quantized; decode: over the layer's cap, the lowest-scored tokens are evicted from the
   full-precision window only -- a quantized block is never touched again.
3. Sinks (positions < n_sink) and the newest token are never evicted; ties keep the earlier token.
4. Indexer keys (DSA F layers) stay full precision and follow their layer's evictions, so an
   S layer reusing its F layer's top-k positions sees only positions it still holds (the model
   maps positions to this layer's keys; unheld ones are dropped).
Bits 16 for a layer's K or V means "not quantized" (the identity setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.kv_quant import BITS, PackedKV, quantize_pack, unpack_dequantize
from tuning.prefixkv.plan import plan_counts
from tuning.prefixkv.search import n_protected
from workers.caches import CACHES
from workers.caches.packed_view import PackedKVView
from workers.caches.precision import PREFILL_REGIMES
from workers.caches.protocol import KVView
from workers.caches.scoring import ScoreConfig, received, static_scores

FULL_BITS = 16


@dataclass(frozen=True)
class ComposedSpec:
    """k_bits/v_bits: [L] (16 = full precision) or None; fractions: [L] PrefixKV keep fractions or None."""

    n_layers: int
    k_bits: tuple[int, ...] | None = None
    v_bits: tuple[int, ...] | None = None
    mode: str = "kivi"
    group: int = 32
    residual: int = 32
    fractions: tuple[float, ...] | None = None
    keep_ratio: float = 1.0
    n_sink: int = 4
    score: ScoreConfig = ScoreConfig("sum")
    prefill: str = "full"  # workers.caches.precision.PREFILL_REGIMES

    def __post_init__(self) -> None:
        L = self.n_layers
        if self.prefill not in PREFILL_REGIMES:
            raise ValueError(f"prefill={self.prefill!r}: one of {PREFILL_REGIMES}")
        for name, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if bits is not None and (len(bits) != L or any(b not in (*BITS, FULL_BITS) for b in bits)):
                raise ValueError(f"{name}={bits!r}: needs {L} entries from {(*BITS, FULL_BITS)}")
        if (self.k_bits is None) != (self.v_bits is None):
            raise ValueError("k_bits and v_bits must be given together")
        if self.mode not in ("kivi", "per_token"):
            raise ValueError(f"mode={self.mode!r}: 'kivi' or 'per_token'")
        if self.group < 1 or self.residual < 0:
            raise ValueError(f"group={self.group!r} must be >= 1 and residual={self.residual!r} >= 0")
        if self.fractions is not None and len(self.fractions) != L:
            raise ValueError(f"fractions has {len(self.fractions)} entries for a {L}-layer model")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio={self.keep_ratio!r}: must be in (0, 1]")

    @property
    def block(self) -> int:
        return self.group if self.mode == "kivi" else 1

    @property
    def evicts(self) -> bool:
        return self.fractions is not None

    @property
    def quantizes(self) -> bool:
        return self.k_bits is not None


def plan_prefill_counts(spec: ComposedSpec, n_tokens: int) -> list[int]:
    """[L] tokens each layer keeps after a prefill of n_tokens (exact total; short prompts keep their sinks)."""
    sink = min(spec.n_sink, n_tokens)
    try:
        return [int(c) for c in plan_counts(spec.fractions, n_tokens, spec.keep_ratio, sink)]
    except ValueError:
        # Budget below the always-kept tokens (a very short prompt): keep only those.
        return [n_protected(n_tokens, sink)] * spec.n_layers


def decode_cap(spec: ComposedSpec, count: int, prefill_len: int, seen: int) -> int:
    """Most tokens a layer may hold after `seen` tokens, given its post-prefill count."""
    floor = n_protected(seen, min(spec.n_sink, seen))
    return max(floor, int(np.floor(count / prefill_len * seen + 0.5)))


class _Layer:
    """One layer's storage: quantized chunks + full-precision window (and their positions)."""

    def __init__(self) -> None:
        # The quantized part, one PackedKV (or fp tensor for a 16-bit layer) per K and V, blocks appended
        # in order: a decode step dequantizes it in one call, not one per block.
        self.qk: PackedKV | torch.Tensor | None = None
        self.qv: PackedKV | torch.Tensor | None = None
        self.q_pos: torch.Tensor | None = None  # [B, Sq]
        self.q_idx: torch.Tensor | None = None  # [B, Sq, Di]
        self.k = self.v = self.pos = self.idx = self.score = None  # window [B, Sw, ...]
        self.seen = 0  # tokens observed (eviction bookkeeping)
        self.pending = 0  # tokens written by update, not yet observed
        self.written = 0

    @property
    def n_quantized(self) -> int:
        return 0 if self.q_pos is None else self.q_pos.shape[1]

    @property
    def n_window(self) -> int:
        return 0 if self.pos is None else self.pos.shape[1]


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else torch.cat([a, b], 1)


def _appended(q: PackedKV | torch.Tensor | None, block: PackedKV | torch.Tensor) -> PackedKV | torch.Tensor:
    """A layer's quantized part with a newly quantized block after it (fp tensors for 16-bit layers)."""
    if q is None:
        return block
    return torch.cat([q, block], 1) if isinstance(q, torch.Tensor) else q.append(block)


def _dequantized(q: PackedKV | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q if isinstance(q, torch.Tensor) else unpack_dequantize(q, dtype)


def _take(t: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    """Rows of t [B, S, ...] at keep [B, n] along dim 1."""
    if t is None:
        return None
    idx = keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return torch.gather(t, 1, idx)


@CACHES.register
class ComposedCache:
    """Eviction (PrefixKV) then quantization (KVTuner), per layer; see the module docstring."""

    name = "composed"

    def __init__(self, spec: ComposedSpec) -> None:
        self.spec = spec
        self.layers = [_Layer() for _ in range(spec.n_layers)]
        self.counts: list[int] | None = None
        self.prefill_len: int | None = None

    # -- protocol ---------------------------------------------------------------------------
    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        """k, v [B, T, Hkv, Dh], pos [B, T], idx_k [B, T, Di] | None -> every visible key [B, S, ...]."""
        st = self.layers[layer]
        if st.pending:
            raise RuntimeError(f"layer {layer}: observe() was not called after the last update (pass observer=)")
        st.k, st.v, st.pos, st.idx = _cat(st.k, k), _cat(st.v, v), _cat(st.pos, pos), _cat(st.idx, idx_k)
        st.written += k.shape[1]
        if self.spec.evicts:
            st.score = _cat(st.score, static_scores(self.spec.score, layer, pos))
            st.pending = k.shape[1]
            return self._view(layer, k.dtype)
        if self.spec.prefill == "full":  # the flush rebinds the window, so this view stays as it was
            view = self._view(layer, k.dtype)
            self._flush(layer)
            return view
        self._flush(layer)
        return self._view(layer, k.dtype)

    @property
    def observes(self) -> bool:
        """Whether forwards must call observe (workers.caches.protocol.observer_for): only to evict."""
        return self.spec.evicts

    def observe(self, layer, q, k, q_pos, k_pos) -> None:
        """Observer hook: q [B, T, H, Dh]; k [B, S, Hkv, Dh] and k_pos [B, S] are this layer's view."""
        if not self.spec.evicts:
            return
        st = self.layers[layer]
        n_new, st.pending = st.pending, 0
        if self.spec.score.uses_attention:
            st.score = st.score + received(self.spec.score, q, k, q_pos, k_pos)[:, st.n_quantized :]
        first = st.seen == 0
        st.seen += n_new
        if first:
            if self.counts is None:
                self.counts, self.prefill_len = plan_prefill_counts(self.spec, n_new), n_new
            target = self.counts[layer]
        else:
            target = decode_cap(self.spec, self.counts[layer], self.prefill_len, st.seen)
        self._evict_window(layer, target)
        self._flush(layer)

    def length(self, layer: int) -> int:
        """Tokens this layer has been given (the next position), as workers.prefixkv.EvictingCache:
        models derive default positions from length(0), and evicted tokens still advance them."""
        return self.layers[layer].written

    def kept(self, layer: int) -> int:
        """Tokens this layer still holds."""
        st = self.layers[layer]
        return st.n_quantized + st.n_window

    def nbytes(self) -> int:
        """Bytes held: packed codes + scales/mins, the full-precision window, indexer keys."""
        total = 0
        for st in self.layers:
            for q in (st.qk, st.qv):
                if q is not None:
                    total += q.numel() * q.element_size() if isinstance(q, torch.Tensor) else q.nbytes()
            for t in (st.q_idx, st.k, st.v, st.idx):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def positions(self, layer: int) -> torch.Tensor:
        """[B, S] positions the layer holds, ascending."""
        st = self.layers[layer]
        return _cat(st.q_pos, st.pos)

    # -- internals ----------------------------------------------------------------------------
    def _view(self, layer: int, dtype: torch.dtype) -> KVView | PackedKVView:
        st = self.layers[layer]
        k, v = st.k, st.v
        if isinstance(st.qk, PackedKV) and isinstance(
            st.qv, PackedKV
        ):  # left packed: a decode step attends the codes (workers.caches.packed_view)
            return PackedKVView(st.qk, st.qv, st.q_pos, k, v, st.pos, _cat(st.q_idx, st.idx), dtype)
        if st.qk is not None:
            k = torch.cat([_dequantized(st.qk, dtype), k], 1)
            v = torch.cat([_dequantized(st.qv, dtype), v], 1)
        return KVView(k, v, _cat(st.q_pos, st.pos), _cat(st.q_idx, st.idx))

    def _evict_window(self, layer: int, target: int) -> None:
        """Drop the lowest-scored unprotected window tokens until the layer holds <= target."""
        st = self.layers[layer]
        excess = self.kept(layer) - target
        if excess <= 0:
            return
        newest = st.pos.max(dim=1, keepdim=True).values
        protected = (st.pos < self.spec.n_sink) | (st.pos == newest)
        # Never more than the window's unprotected tokens: quantized blocks are final.
        excess = min(excess, int((~protected).sum(1).min()))
        if excess <= 0:
            return
        key = torch.where(protected, torch.full_like(st.score, float("inf")), st.score)
        order = torch.sort(-key, dim=1, stable=True).indices[:, : st.n_window - excess]
        keep = torch.sort(order, dim=1).values
        st.k, st.v, st.pos = _take(st.k, keep), _take(st.v, keep), _take(st.pos, keep)
        st.idx, st.score = _take(st.idx, keep), _take(st.score, keep)

    def _flush(self, layer: int) -> None:
        """Quantize whole blocks of the window's oldest tokens beyond the newest R."""
        if not self.spec.quantizes:
            return
        st, s = self.layers[layer], self.spec
        f = ((st.n_window - s.residual) // s.block) * s.block
        if f <= 0:
            return
        new = []
        for bits, role, src in ((s.k_bits[layer], "k", st.k), (s.v_bits[layer], "v", st.v)):
            block = src[:, :f]
            new.append(block.clone() if bits == FULL_BITS else quantize_pack(block, bits, s.mode, role, s.group))
        st.qk, st.qv = _appended(st.qk, new[0]), _appended(st.qv, new[1])
        st.q_pos, st.q_idx = _cat(st.q_pos, st.pos[:, :f]), _cat(st.q_idx, None if st.idx is None else st.idx[:, :f])
        st.k, st.v, st.pos = st.k[:, f:], st.v[:, f:], st.pos[:, f:]
        st.idx = None if st.idx is None else st.idx[:, f:]
        st.score = None if st.score is None else st.score[:, f:]
