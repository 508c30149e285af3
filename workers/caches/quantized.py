"""Quantized KV caches: `FakeQuantCache` (search) and `PackedKVCache` (serving), identical numerics.

Shape legend: B batch, T new tokens, S cached tokens, Hkv key/value heads, Dh head dim,
Di indexer head dim, R residual window, G group, W int32 words per head vector.

Both implement the cache protocol of workers/caches/protocol.py and share one rule:
1. New tokens are written into preallocated buffers (grown by doubling, never concatenated
   per step) behind the full-precision window.
2. After the write, while the window holds >= R + block tokens, its oldest `block` tokens
   (KIVI: G, so key groups never straddle blocks; per-token: 1) are quantized with
   kernels.kv_quant, once: a quantized token is never touched again.
3. What the forward attends to (`KVQuantConfig.prefill`): "full" (default) -- the tokens this
   update wrote are seen at full precision, everything stored before as the cache holds it, so
   a prefill attends to its own keys and values unquantized and only later forwards read the
   quantized ones (KIVI; transformers' QuantizedCache); "quantized" -- exactly what the cache
   holds after this update, so even a single prefill attends quantized keys and values.

`FakeQuantCache` writes x_hat = fake_quantize(x) in place into one fp buffer (cheap to read);
`PackedKVCache` keeps int32 codes + fp32 scale/min (`PackedKV`) and dequantizes on read.
`fake_quantize` is bit-identical to `unpack_dequantize(quantize_pack(x))`, so both caches
return the same tensors. Keys' indexer vectors (DSA models) stay in full precision.
"""

from __future__ import annotations

import torch

from kernels.kv_quant import PackedKV, fake_quantize, quantize_pack, unpack_dequantize
from workers.caches import CACHES
from workers.caches.packed_view import PackedKVView
from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache, KVView


def _grow(t: torch.Tensor | None, n_used: int, cap: int, fill=0) -> torch.Tensor | None:
    """Copy the first n_used slots of t [B, S, ...] into a new buffer with cap slots."""
    if t is None:
        return None
    new = torch.full((t.shape[0], cap, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
    new[:, :n_used] = t[:, :n_used]
    return new


class _QuantizedCache:
    """Shared bookkeeping: per-layer token counts, positions, indexer keys, flush rule."""

    def __init__(self, config: KVQuantConfig, capacity: int = 0) -> None:
        if not isinstance(config, KVQuantConfig):
            raise TypeError(f"config must be a KVQuantConfig, got {type(config).__name__}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.config = config
        self.capacity_hint = capacity
        n = config.n_layers
        self.n = [0] * n  # tokens held per layer
        self.nq = [0] * n  # of which quantized
        self.quantized_total = [0] * n  # tokens ever passed through the quantizer
        self.pos: list[torch.Tensor | None] = [None] * n  # [B, cap] long, -1 = empty
        self.idx: list[torch.Tensor | None] = [None] * n  # [B, cap, Di]

    def _check(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        if not 0 <= layer < self.config.n_layers:
            raise ValueError(f"layer {layer} out of range for a {self.config.n_layers}-layer precision map")
        if k.dim() != 4 or k.shape != v.shape or pos.shape != k.shape[:2]:
            raise ValueError(f"update expects k, v [B,T,Hkv,Dh] and pos [B,T]; got {k.shape}, {v.shape}, {pos.shape}")

    def _cap(self, need: int, cur: int) -> int:
        g = self.config.block
        cap = max(need, 2 * cur, self.capacity_hint, g)
        return -(-cap // g) * g

    def _meta_write(self, layer: int, pos: torch.Tensor, idx_k: torch.Tensor | None, s0: int, cap: int) -> None:
        B, T = pos.shape
        if self.pos[layer] is None or self.pos[layer].shape[1] < s0 + T:
            if self.pos[layer] is None:
                self.pos[layer] = torch.full((B, cap), -1, dtype=torch.long, device=pos.device)
                if idx_k is not None:
                    self.idx[layer] = idx_k.new_zeros(B, cap, idx_k.shape[-1])
            else:
                self.pos[layer] = _grow(self.pos[layer], s0, cap, fill=-1)
                self.idx[layer] = _grow(self.idx[layer], s0, cap)
        self.pos[layer][:, s0 : s0 + T] = pos
        if idx_k is not None and self.idx[layer] is not None:
            self.idx[layer][:, s0 : s0 + T] = idx_k

    def _to_flush(self, layer: int) -> int:
        """Tokens to quantize now: whole blocks beyond the residual window."""
        spill = self.n[layer] - self.nq[layer] - self.config.residual
        b = self.config.block
        return (spill // b) * b if spill >= b else 0

    def length(self, layer: int) -> int:
        return self.n[layer]

    def _stored_view(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KVView:
        n = self.n[layer]
        idx = None if self.idx[layer] is None else self.idx[layer][:, :n]
        return KVView(k, v, self.pos[layer][:, :n], idx)

    def _attended(self, layer: int, k: torch.Tensor, v: torch.Tensor, flushing: int) -> KVView | None:
        """The view a "full"-prefill forward attends to when this update quantizes `flushing` tokens:
        k, v [B, S, Hkv, Dh] as held before the flush (copied: the flush rewrites the buffers). None
        when nothing is flushed or the regime is "quantized" (the view after the flush is the one)."""
        if not flushing or self.config.prefill != "full":
            return None
        return self._stored_view(layer, k.clone(), v.clone())

    @property
    def nominal_bits(self) -> float:
        return self.config.nominal_bits

    def stored_bits(self) -> float:
        """Bits per K/V element actually held now (codes + scales/mins + window), mean over layers."""
        total, elems = 0, 0
        for layer in range(self.config.n_layers):
            b, e = self._kv_bytes(layer)
            total, elems = total + 8 * b, elems + e
        return total / elems if elems else 0.0

    def nbytes(self) -> int:
        """Bytes of K/V (and indexer keys) held for the tokens in the cache."""
        total = 0
        for layer in range(self.config.n_layers):
            total += self._kv_bytes(layer)[0]
            if self.idx[layer] is not None:
                total += self.idx[layer][:, : self.n[layer]].numel() * self.idx[layer].element_size()
        return total

    def _kv_bytes(self, layer: int) -> tuple[int, int]:
        raise NotImplementedError


@CACHES.register
class FakeQuantCache(_QuantizedCache):
    """Stores x_hat (dequantized values) in one fp buffer per layer: fast reads for the search."""

    name = "fake"

    def __init__(self, config: KVQuantConfig, capacity: int = 0) -> None:
        super().__init__(config, capacity)
        self.k: list[torch.Tensor | None] = [None] * config.n_layers  # [B, cap, Hkv, Dh]
        self.v: list[torch.Tensor | None] = [None] * config.n_layers

    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        self._check(layer, k, v, pos)
        s0, T = self.n[layer], k.shape[1]
        cur = 0 if self.k[layer] is None else self.k[layer].shape[1]
        if s0 + T > cur:
            cap = self._cap(s0 + T, cur)
            if self.k[layer] is None:
                self.k[layer] = k.new_zeros(k.shape[0], cap, *k.shape[2:])
                self.v[layer] = v.new_zeros(v.shape[0], cap, *v.shape[2:])
            else:
                self.k[layer] = _grow(self.k[layer], s0, cap)
                self.v[layer] = _grow(self.v[layer], s0, cap)
            self._meta_write(layer, pos, idx_k, s0, cap)
        else:
            self._meta_write(layer, pos, idx_k, s0, cur)
        self.k[layer][:, s0 : s0 + T] = k
        self.v[layer][:, s0 : s0 + T] = v
        self.n[layer] += T
        f = self._to_flush(layer)
        n = self.n[layer]
        before = self._attended(layer, self.k[layer][:, :n], self.v[layer][:, :n], f)
        if f:
            q0, c = self.nq[layer], self.config
            pair = c.layers[layer]
            kb, vb = self.k[layer][:, q0 : q0 + f], self.v[layer][:, q0 : q0 + f]
            kb.copy_(fake_quantize(kb, pair.k, c.mode, "k", c.group))
            vb.copy_(fake_quantize(vb, pair.v, c.mode, "v", c.group))
            self.nq[layer] += f
            self.quantized_total[layer] += f
        return before or self._stored_view(layer, self.k[layer][:, :n], self.v[layer][:, :n])

    def _kv_bytes(self, layer: int) -> tuple[int, int]:
        if self.k[layer] is None:
            return 0, 0
        used = self.k[layer][:, : self.n[layer]]
        return 2 * used.numel() * used.element_size(), 2 * used.numel()


@CACHES.register
class PackedKVCache(_QuantizedCache):
    """int32-packed codes + fp32 scale/min per group (kernels.kv_quant layout) + fp window."""

    name = "packed"

    def __init__(self, config: KVQuantConfig, capacity: int = 0) -> None:
        super().__init__(config, capacity)
        n = config.n_layers
        self.kp: list[PackedKV | None] = [None] * n  # quantized slots [0, nq)
        self.vp: list[PackedKV | None] = [None] * n
        self.kw: list[torch.Tensor | None] = [None] * n  # window [B, wcap, Hkv, Dh], slots [0, n - nq)
        self.vw: list[torch.Tensor | None] = [None] * n

    def _alloc_packed(self, layer: int, like: torch.Tensor, cap: int) -> None:
        c, pair = self.config, self.config.layers[layer]
        B, _, H, Dh = like.shape
        new = [
            PackedKV.allocate(B, cap, H, Dh, bits, c.mode, role, c.group, like.device)
            for bits, role in ((pair.k, "k"), (pair.v, "v"))
        ]
        nq = self.nq[layer]
        for old, dst in zip((self.kp[layer], self.vp[layer]), new):
            if old is not None and nq:
                dst.write_(0, old.slice(0, nq))
        self.kp[layer], self.vp[layer] = new

    def update(self, layer, k, v, pos, idx_k=None) -> KVView:
        self._check(layer, k, v, pos)
        s0, T = self.n[layer], k.shape[1]
        cur = 0 if self.pos[layer] is None else self.pos[layer].shape[1]
        cap = self._cap(s0 + T, cur) if s0 + T > cur else cur
        self._meta_write(layer, pos, idx_k, s0, cap)
        nw = s0 - self.nq[layer]
        wcur = 0 if self.kw[layer] is None else self.kw[layer].shape[1]
        if nw + T > wcur:
            wcap = max(nw + T, self.config.residual + self.config.block)
            if self.kw[layer] is None:
                self.kw[layer] = k.new_zeros(k.shape[0], wcap, *k.shape[2:])
                self.vw[layer] = v.new_zeros(v.shape[0], wcap, *v.shape[2:])
            else:
                self.kw[layer] = _grow(self.kw[layer], nw, wcap)
                self.vw[layer] = _grow(self.vw[layer], nw, wcap)
        self.kw[layer][:, nw : nw + T] = k
        self.vw[layer][:, nw : nw + T] = v
        self.n[layer] += T
        f = self._to_flush(layer)
        before = self._attended(layer, *self._dequantized(layer, k.dtype), f) if f else None
        if f:
            c, pair, q0 = self.config, self.config.layers[layer], self.nq[layer]
            if self.kp[layer] is None or self.kp[layer].length < q0 + f:
                self._alloc_packed(layer, k, self._cap(q0 + f, 0 if self.kp[layer] is None else self.kp[layer].length))
            self.kp[layer].write_(q0, quantize_pack(self.kw[layer][:, :f], pair.k, c.mode, "k", c.group))
            self.vp[layer].write_(q0, quantize_pack(self.vw[layer][:, :f], pair.v, c.mode, "v", c.group))
            rest = nw + T - f
            # shift the (short, bounded by R + block + T) window left; the quantized part never moves
            self.kw[layer][:, :rest] = self.kw[layer][:, f : f + rest].clone()
            self.vw[layer][:, :rest] = self.vw[layer][:, f : f + rest].clone()
            self.nq[layer] += f
            self.quantized_total[layer] += f
        return before or self._view(layer, k.dtype)

    def packed_view(self, layer: int):
        """Inputs of kernels.decode_attention: (k_packed, v_packed, packed_pos [B,Sq], k_win, v_win, win_pos)."""
        nq, n = self.nq[layer], self.n[layer]
        kp = None if self.kp[layer] is None else self.kp[layer].slice(0, nq)
        vp = None if self.vp[layer] is None else self.vp[layer].slice(0, nq)
        nw = n - nq
        return kp, vp, self.pos[layer][:, :nq], self.kw[layer][:, :nw], self.vw[layer][:, :nw], self.pos[layer][:, nq:n]

    def _dequantized(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token's keys and values [B, S, Hkv, Dh]: dequantized codes, then the window."""
        kp, vp, _, kw, vw, _ = self.packed_view(layer)
        if kp is not None and kp.length:
            return torch.cat([unpack_dequantize(kp, dtype), kw], 1), torch.cat([unpack_dequantize(vp, dtype), vw], 1)
        return kw, vw

    def _view(self, layer: int, dtype: torch.dtype) -> KVView | PackedKVView:
        """What is stored, with the packed part left packed (read as tensors only if asked)."""
        kp, vp, ppos, kw, vw, wpos = self.packed_view(layer)
        if kp is None or not kp.length:
            return self._stored_view(layer, kw, vw)
        idx = None if self.idx[layer] is None else self.idx[layer][:, : self.n[layer]]
        return PackedKVView(kp, vp, ppos, kw, vw, wpos, idx, dtype)

    def _kv_bytes(self, layer: int) -> tuple[int, int]:
        if self.kw[layer] is None:
            return 0, 0
        kp, vp, _, kw, vw, _ = self.packed_view(layer)
        b = 2 * kw.numel() * kw.element_size()
        if kp is not None:
            b += kp.nbytes() + vp.nbytes()
        B, _, H, Dh = kw.shape
        return b, 2 * B * self.n[layer] * H * Dh


def make_cache(config: KVQuantConfig | None, n_layers: int, kind: str = "fake", capacity: int = 0):
    """The quantized cache registered as `kind` ("fake", "packed") for `config`, or the full-precision
    DynamicCache when config is None."""
    if config is None:
        return DynamicCache(n_layers)
    cls = CACHES.get(kind)
    if not issubclass(cls, _QuantizedCache):
        kinds = [n for n in CACHES.names() if issubclass(CACHES.get(n), _QuantizedCache)]
        raise ValueError(f"cache kind {kind!r} does not quantize; the quantized kinds are {kinds}")
    config.check_model(n_layers)
    return cls(config, capacity)
