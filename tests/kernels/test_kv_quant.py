"""KV quantize + pack: the quantizer's guarantees, the int32 layout, Triton vs reference (exact)."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_quant import PackedKV, fake_quantize, pack_codes, quantize_pack, unpack_codes, unpack_dequantize
from kernels.kv_quant import reference as ref

CASES = [("per_token", "k"), ("per_token", "v"), ("kivi", "k"), ("kivi", "v")]


def _x(b=2, s=32, h=2, dh=48, seed=0):
    x = torch.randn(b, s, h, dh, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, 1, 0] = 0.5  # a constant group (max == min): scale 0, exact reconstruction
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip_and_layout(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 37), generator=torch.Generator().manual_seed(bits))
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape[-1] == -(-37 * bits // 32)
    assert torch.equal(unpack_codes(words, bits, 37), codes.int())
    # layout: code d sits in word d // (32 / bits) at bit offset bits * (d % (32 / bits))
    per = 32 // bits
    d = 19
    assert int(words[0, 0, d // per]) >> (bits * (d % per)) & (2**bits - 1) == int(codes[0, 0, d])


@pytest.mark.parametrize("mode,role", CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_error_bound_and_fake_quant_identity(bits, mode, role):
    x = _x()
    p = ref.quantize_pack(x, bits, mode, role, group=16)
    x_hat = unpack_dequantize(p)
    # round-to-nearest: every element within half a step of its group's scale
    rt, rc = p.rt, p.rc
    step = p.scale.repeat_interleave(rt, 1).repeat_interleave(rc, 3)[..., :48]
    assert ((x_hat - x).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(x_hat[0, 1, 0], x[0, 1, 0]) if mode == "per_token" else True
    assert torch.equal(fake_quantize(x, bits, mode, role, group=16), x_hat)
    want_scale = {"per_token": (2, 32, 2, 1), "k": (2, 2, 2, 48), "v": (2, 32, 2, 3)}
    assert tuple(p.scale.shape) == want_scale["per_token" if mode == "per_token" else role]


def test_more_bits_less_error():
    x = _x()
    errs = [(unpack_dequantize(quantize_pack(x, b, "kivi", "v", 32)) - x).pow(2).mean() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_matches_reference_exactly(force_triton, bits):
    x = _x(b=1, s=32, h=2, dh=48, seed=bits)
    for mode, role in [("per_token", "k"), ("kivi", "k"), ("kivi", "v")]:
        p, r = quantize_pack(x, bits, mode, role, group=16), ref.quantize_pack(x, bits, mode, role, group=16)
        assert torch.equal(p.codes, r.codes), (bits, mode, role)
        assert torch.equal(p.scale, r.scale) and torch.equal(p.zero, r.zero)
        assert torch.equal(unpack_dequantize(p), ref.unpack_dequantize(r))


def test_in_place_block_writes():
    store = PackedKV.allocate(1, 64, 2, 48, 4, "kivi", "k", 32)
    x = _x(b=1, s=64)
    for s0 in (0, 32):  # a block is quantized once, when it fills, and written in place
        store.write_(s0, quantize_pack(x[:, s0 : s0 + 32], 4, "kivi", "k", 32))
    assert torch.equal(unpack_dequantize(store), fake_quantize(x, 4, "kivi", "k", 32))
    assert store.nbytes() == 64 * 2 * 6 * 4 + 2 * (2 * 2 * 48 * 4)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_pack(_x(), 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize_pack(_x(), 4, mode="kivy")
    with pytest.raises(ValueError, match="S % G == 0, got S=30"):
        quantize_pack(_x(s=30), 4, mode="kivi", role="k", group=32)
