"""Quantized KV caches: error bounds, fake == packed, quantize-once, byte accounting, odd lengths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention
from workers.caches.precision import KVQuantConfig
from workers.caches.quantized import FakeQuantCache, PackedKVCache, make_cache

B, H, DH = 2, 2, 12  # Dh = 12 with G = 8: the last value channel group is short (4 channels)


def _feed(cache, chunks, layer=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t0, views, raw_k, raw_v = 0, [], [], []
    for T in chunks:
        k = torch.randn(B, T, H, DH, generator=g) * torch.linspace(0.5, 4, DH)  # channel-varying scale
        v = torch.randn(B, T, H, DH, generator=g)
        pos = torch.arange(t0, t0 + T).expand(B, T)
        view = cache.update(layer, k, v, pos)
        views.append((view.k.clone(), view.v.clone(), view.pos.clone()))
        raw_k.append(k)
        raw_v.append(v)
        t0 += T
    return views, torch.cat(raw_k, 1), torch.cat(raw_v, 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mode", ["kivi", "per_token"])
def test_error_bound_per_bit_width(bits, mode):
    """|x - x_hat| <= half a quantization step of the element's own group, and error shrinks with bits."""
    G = 8
    cfg = KVQuantConfig.uniform(
        f"KV{bits}", 1, mode=mode, group=G, residual=0, prefill="quantized"
    )  # views = what is stored
    views, k, v = _feed(FakeQuantCache(cfg), [40])
    kh, vh, _ = views[-1]
    n = 40
    if mode == "kivi":
        kg = k.view(B, n // G, G, H, DH)  # keys: per channel over G tokens
        k_step = (kg.amax(2) - kg.amin(2)).repeat_interleave(G, 1) / (2**bits - 1)
        vpad = F.pad(v, (0, 16 - DH), value=float("nan")).view(B, n, H, 2, G)  # values: G channels per token
        vr = vpad.nan_to_num(-1e9).amax(-1) - vpad.nan_to_num(1e9).amin(-1)
        v_step = vr.repeat_interleave(G, -1)[..., :DH] / (2**bits - 1)
    else:
        k_step = (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / (2**bits - 1)
        v_step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / (2**bits - 1)
    assert ((kh - k).abs() <= k_step / 2 * (1 + 1e-4) + 1e-6).all()
    assert ((vh - v).abs() <= v_step / 2 * (1 + 1e-4) + 1e-6).all()
    rel = (kh - k).norm() / k.norm()
    assert rel < {2: 0.4, 4: 0.08, 8: 0.005}[bits]


@pytest.mark.parametrize("mode", ["kivi", "per_token"])
def test_fake_and_packed_identical_attention(mode):
    """Same tensors out of both caches at every step, so identical attention; packed decode kernel agrees."""
    cfg = KVQuantConfig(("K8V4", "K2V2"), mode=mode, group=8, residual=5)
    fake, packed = FakeQuantCache(cfg), PackedKVCache(cfg)
    for layer in (0, 1):
        vf, _, _ = _feed(fake, [37, 1, 1, 3, 20, 1, 9], layer, seed=layer)
        vp, _, _ = _feed(packed, [37, 1, 1, 3, 20, 1, 9], layer, seed=layer)
        q = torch.randn(B, 1, 2 * H, DH)
        for (kf, vvf, pf), (kp, vvp, pp) in zip(vf, vp):
            assert torch.equal(kf, kp) and torch.equal(vvf, vvp) and torch.equal(pf, pp)
            of = F.scaled_dot_product_attention(
                q.transpose(1, 2), kf.transpose(1, 2), vvf.transpose(1, 2), enable_gqa=True
            )
            op = F.scaled_dot_product_attention(
                q.transpose(1, 2), kp.transpose(1, 2), vvp.transpose(1, 2), enable_gqa=True
            )
            assert torch.equal(of, op)
        # the serving path reads the packed codes directly (no dequantized copy) and matches what is stored
        # (the last update's view showed its own tokens at full precision: prefill="full")
        kq, vq, ppos, kw, vw, wpos = packed.packed_view(layer)
        qpos = torch.full((B, 1), int(pp.max()))
        out = decode_attention(q, kq, vq, ppos, kw, vw, wpos, qpos)
        stored = packed._view(layer, torch.float32)
        ref = F.scaled_dot_product_attention(
            q.transpose(1, 2), stored.k.transpose(1, 2), stored.v.transpose(1, 2), enable_gqa=True
        ).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fake", "packed"])
def test_block_never_requantized(kind):
    """Appending tokens leaves every already-quantized value bit-for-bit unchanged."""
    cfg = KVQuantConfig(("KV2",), mode="kivi", group=8, residual=8, prefill="quantized")  # views = what is stored
    cache = make_cache(cfg, 1, kind)
    views, k, _ = _feed(cache, [19, 1, 5, 1, 1, 13, 2, 30])
    for i in range(1, len(views)):
        prev_k, prev_v, _ = views[i - 1]
        nq_prev = cfg.quantized_tokens(prev_k.shape[1])
        assert torch.equal(views[i][0][:, :nq_prev], prev_k[:, :nq_prev])
        assert torch.equal(views[i][1][:, :nq_prev], prev_v[:, :nq_prev])
    n = k.shape[1]
    assert cache.nq[0] == cfg.quantized_tokens(n) and cache.quantized_total[0] == cache.nq[0]
    assert cache.nq[0] % 8 == 0
    # the window (newest >= R tokens) is exact
    assert torch.equal(views[-1][0][:, cache.nq[0] :], k[:, cache.nq[0] :])
    assert n - cache.nq[0] >= cfg.residual


@pytest.mark.parametrize("mode", ["kivi", "per_token"])
def test_stored_bytes_match_formula(mode):
    cfg = KVQuantConfig(("K8V4", "K4V2", "KV2"), mode=mode, group=8, residual=4)
    cache = PackedKVCache(cfg)
    n = 53
    for layer in range(3):
        _feed(cache, [17, 1, 30, 5], layer)
    words = {8: math.ceil(DH * 8 / 32), 4: math.ceil(DH * 4 / 32), 2: math.ceil(DH * 2 / 32)}
    expect = 0
    for p in cfg.layers:
        nq = cfg.quantized_tokens(n)
        for role, bits in (("k", p.k), ("v", p.v)):
            if mode == "per_token":
                groups = nq
            else:
                groups = (nq // 8) * DH if role == "k" else nq * math.ceil(DH / 8)
            expect += B * H * (nq * words[bits] * 4 + groups * 2 * 4 + (n - nq) * DH * 4)
    assert cache.nbytes() == expect
    bits = 8 * expect / (2 * B * H * DH * n * 3)
    assert cache.stored_bits() == pytest.approx(bits)
    assert cfg.stored_bits(n, DH) == pytest.approx(bits)
    assert cfg.nominal_bits == pytest.approx((6 + 3 + 2) / 3)
    full = make_cache(None, 3)
    for layer in range(3):
        _feed(full, [n], layer)
    assert cache.nbytes() < full.nbytes()


def test_odd_lengths_groups_stay_within_channels():
    """T not a multiple of G: only whole G-token key blocks are quantized, each per channel;
    a value group never mixes channels beyond its own G-channel slice."""
    G = 8
    cfg = KVQuantConfig(("KV2",), mode="kivi", group=G, residual=3, prefill="quantized")  # views = what is stored
    base = FakeQuantCache(cfg)
    views, k, v = _feed(base, [21])  # 21 = 2 blocks + 5 tokens
    assert base.nq[0] == 16  # 21 - 3 = 18 spill -> 2 whole blocks
    kh, vh, _ = views[-1]
    k2, v2 = k.clone(), v.clone()
    k2[..., 5] *= 50.0  # a huge key channel 5 must not change other channels' keys
    v2[..., 10] *= 50.0  # value channel 10 (group 8..11) must not change channels 0..7
    other = FakeQuantCache(cfg)
    kh2 = other.update(0, k2, v2, torch.arange(21).expand(B, 21))
    keep_k = [c for c in range(DH) if c != 5]
    assert torch.equal(kh2.k[..., keep_k], kh[..., keep_k])
    assert torch.equal(kh2.v[..., :8], vh[..., :8])
    assert not torch.equal(kh2.v[:, :16, :, 8:], vh[:, :16, :, 8:])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="bits"):
        KVQuantConfig(("K3V4",))
    with pytest.raises(ValueError, match="mode"):
        KVQuantConfig(("KV4",), mode="per_channel")
    with pytest.raises(ValueError, match="residual"):
        KVQuantConfig(("KV4",), residual=-1)
    with pytest.raises(ValueError, match="prefill"):
        KVQuantConfig(("KV4",), prefill="fp16")
    with pytest.raises(ValueError, match="layers"):
        make_cache(KVQuantConfig(("KV4", "KV4")), 3)
    cache = FakeQuantCache(KVQuantConfig(("KV4",)))
    with pytest.raises(ValueError, match="out of range"):
        cache.update(1, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, dtype=torch.long))


def test_cache_registry_names_every_cache():
    """Configs pick caches by name; make_cache takes only the quantized ones and names a wrong kind."""
    from workers.caches import CACHES
    from workers.caches.protocol import DynamicCache

    assert CACHES.names() == ("composed", "evicting", "fake", "full", "packed")
    assert CACHES.get("packed") is PackedKVCache and CACHES.get("full") is DynamicCache
    assert isinstance(make_cache(KVQuantConfig(("KV4",)), 1, "packed"), PackedKVCache)
    with pytest.raises(ValueError, match="'evicting' does not quantize"):
        make_cache(KVQuantConfig(("KV4",)), 1, "evicting")
    with pytest.raises(ValueError, match="cache 'int3' is not one of"):
        make_cache(KVQuantConfig(("KV4",)), 1, "int3")


@pytest.mark.parametrize("kind", ["fake", "packed"])
def test_full_precision_prefill_attends_its_own_tokens_and_stores_them_quantized(kind):
    """prefill="full": a forward sees the K/V it wrote unquantized; the next forward reads them quantized.
    prefill="quantized": the forward already sees what is stored."""
    full = make_cache(KVQuantConfig(("KV2",), group=8, residual=8), 1, kind)
    old = make_cache(KVQuantConfig(("KV2",), group=8, residual=8, prefill="quantized"), 1, kind)
    (pre_full, _), (pre_old, _) = (_feed(c, [40])[0][0][:2] for c in (full, old))
    _, k, v = _feed(make_cache(None, 1), [40])  # the same seeded tokens
    assert torch.equal(pre_full, k)  # the prefill attends full precision
    assert not torch.equal(pre_old[:, :32], k[:, :32])  # 32 of 40 quantized at once
    nxt = torch.randn(B, 1, H, DH)
    after_full = full.update(0, nxt, nxt, torch.full((B, 1), 40))
    after_old = old.update(0, nxt, nxt, torch.full((B, 1), 40))
    assert torch.equal(after_full.k, after_old.k) and torch.equal(after_full.v, after_old.v)  # same storage
    assert torch.equal(after_full.k[:, :32], pre_old[:, :32])  # the decode step reads the quantized prefill
