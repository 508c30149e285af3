"""KV-cache quantize + pack / unpack + dequantize: the one packed-KV layout of the project.

Used by the KVTuner caches (fake-quant for search, packed for serving) and by
`kernels.decode_attention`. Layout and quantizer: see kernels/kv_quant/reference.py.

    p = quantize_pack(k, bits=4, mode="kivi", role="k", group=32)   # k [B, S, Hkv, Dh]
    k_hat = unpack_dequantize(p)                                      # [B, S, Hkv, Dh] fp32
"""

from __future__ import annotations

import torch

from kernels._dispatch import triton_module, use_triton
from kernels.kv_quant import reference
from kernels.kv_quant.reference import (
    BITS,
    MODES,
    PackedKV,
    fake_quantize,
    group_shape,
    pack_codes,
    unpack_codes,
    validate,
    words_per_vector,
)

__all__ = [
    "BITS",
    "MODES",
    "PackedKV",
    "fake_quantize",
    "group_shape",
    "pack_codes",
    "quantize_pack",
    "unpack_codes",
    "unpack_dequantize",
    "words_per_vector",
]


def quantize_pack(x: torch.Tensor, bits: int, mode: str = "per_token", role: str = "k", group: int = 32) -> PackedKV:
    """x [B, S, H, Dh] -> PackedKV(codes [B, S, H, W] int32, scale/zero [B, S//rt, H, ceil(Dh/rc)])."""
    validate(bits, mode, role, group)
    if x.dim() != 4:
        raise ValueError(f"quantize_pack: x must be [B, S, H, Dh], got shape {tuple(x.shape)}")
    rt, _ = group_shape(mode, role, x.shape[-1], group)
    if x.shape[1] % rt:
        raise ValueError(f"quantize_pack: KIVI keys need S % G == 0, got S={x.shape[1]}, G={rt}")
    if use_triton(x):
        return triton_module("kv_quant").quantize_pack(x, bits, mode, role, group)
    return reference.quantize_pack(x, bits, mode, role, group)


def unpack_dequantize(p: PackedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PackedKV -> x_hat [B, S, H, Dh] in `dtype` (bit-identical to fake_quantize in fp32)."""
    if use_triton(p.codes):
        return triton_module("kv_quant").unpack_dequantize(p, dtype)
    return reference.unpack_dequantize(p, dtype)
