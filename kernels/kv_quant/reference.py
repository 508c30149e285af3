"""KV-cache quantize + pack and unpack + dequantize, pure PyTorch (ground truth and CPU path).

The quantizer (spec/kvtuner.md, KIVI): asymmetric uniform over a group of values x,
    scale = (max - min) / (2^b - 1),  code = round(clamp((x - min) / scale, 0, 2^b - 1)),
    x_hat = code * scale + min,       all in fp32; a group with max == min gets code 0.

The packed layout (the one layout of the project; see kernels/kv_quant/__init__.py):
- `codes` [B, S, H, W] int32: the Dh codes of one (token, head) packed little-end-first along
  the head dim, 32 / b per word (16 for 2 bits, 8 for 4, 4 for 8); W = ceil(Dh * b / 32);
  code d sits in word d // (32 / b) at bit offset b * (d % (32 / b)); padding codes are 0.
- `scale`, `zero` (= the group min) [B, S // rt, H, ceil(Dh / rc)] fp32: the group of element
  (s, d) is (s // rt, d // rc). Modes:
    per_token          rt = 1, rc = Dh : one group per token and head (K and V);
    kivi, role "k"     rt = G, rc = 1  : keys per channel over G consecutive tokens;
    kivi, role "v"     rt = 1, rc = G  : values per token over G consecutive channels.
  KIVI keys need S % G == 0 (the cache quantizes only full blocks; the rest stays in its
  full-precision window), so a group never straddles blocks; a short last channel group
  (Dh % G != 0) covers only the channels that exist.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

BITS = (2, 4, 8)
MODES = ("per_token", "kivi")
ROLES = ("k", "v")


def group_shape(mode: str, role: str, dh: int, group: int) -> tuple[int, int]:
    """(rt, rc): tokens and channels per quantization group."""
    if mode == "per_token":
        return 1, dh
    return (group, 1) if role == "k" else (1, group)


def validate(bits: int, mode: str, role: str, group: int) -> None:
    """Clear errors naming the bad value, before any work starts."""
    if bits not in BITS:
        raise ValueError(f"kv_quant: bits must be one of {BITS}, got {bits!r}")
    if mode not in MODES:
        raise ValueError(f"kv_quant: mode must be one of {MODES}, got {mode!r}")
    if role not in ROLES:
        raise ValueError(f"kv_quant: role must be one of {ROLES}, got {role!r}")
    if not (isinstance(group, int) and group >= 1):
        raise ValueError(f"kv_quant: group must be a positive int, got {group!r}")


@dataclass
class PackedKV:
    """A packed quantized K or V block. codes [B, S, H, W] int32; scale, zero [B, S//rt, H, ceil(Dh/rc)]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    dh: int
    rt: int
    rc: int

    @property
    def length(self) -> int:
        """S, the number of token slots."""
        return self.codes.shape[1]

    def nbytes(self) -> int:
        """Bytes held: codes + scales + mins."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def slice(self, s0: int, s1: int) -> PackedKV:
        """Token slots s0:s1 as a view (s0, s1 multiples of rt)."""
        if s0 % self.rt or s1 % self.rt:
            raise ValueError(f"PackedKV.slice: {s0}:{s1} is not aligned to groups of {self.rt} tokens")
        g0, g1 = s0 // self.rt, s1 // self.rt
        return PackedKV(
            self.codes[:, s0:s1],
            self.scale[:, g0:g1],
            self.zero[:, g0:g1],
            self.bits,
            self.dh,
            self.rt,
            self.rc,
        )

    def append(self, block: PackedKV) -> PackedKV:
        """This block's token slots followed by `block`'s (same bits and layout; whole groups)."""
        if (block.bits, block.dh, block.rt, block.rc) != (self.bits, self.dh, self.rt, self.rc):
            raise ValueError("PackedKV.append: blocks of different bits or layout")
        return PackedKV(
            torch.cat([self.codes, block.codes], 1),
            torch.cat([self.scale, block.scale], 1),
            torch.cat([self.zero, block.zero], 1),
            self.bits,
            self.dh,
            self.rt,
            self.rc,
        )

    def write_(self, s0: int, block: PackedKV) -> None:
        """Copy `block` into token slots s0:s0+block.length in place (no re-quantization)."""
        dst = self.slice(s0, s0 + block.length)
        dst.codes.copy_(block.codes)
        dst.scale.copy_(block.scale)
        dst.zero.copy_(block.zero)

    @staticmethod
    def allocate(
        b: int,
        s: int,
        h: int,
        dh: int,
        bits: int,
        mode: str = "per_token",
        role: str = "k",
        group: int = 32,
        device: torch.device | str = "cpu",
    ) -> PackedKV:
        """Zeroed storage for s token slots (s a multiple of the token group)."""
        validate(bits, mode, role, group)
        rt, rc = group_shape(mode, role, dh, group)
        if s % rt:
            raise ValueError(f"PackedKV.allocate: capacity {s} must be a multiple of the key group {rt}")
        w = words_per_vector(dh, bits)
        ng = (s // rt, -(-dh // rc))
        codes = torch.zeros(b, s, h, w, dtype=torch.int32, device=device)
        scale = torch.zeros(b, ng[0], h, ng[1], dtype=torch.float32, device=device)
        return PackedKV(codes, scale, torch.zeros_like(scale), bits, dh, rt, rc)


def words_per_vector(dh: int, bits: int) -> int:
    """int32 words holding Dh codes of `bits` bits."""
    per = 32 // bits
    return -(-dh // per)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., Dh] integers in [0, 2^bits) -> [..., W] int32 (layout in the module docstring)."""
    per = 32 // bits
    dh = codes.shape[-1]
    w = words_per_vector(dh, bits)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, w * per - dh)).view(*codes.shape[:-1], w, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2^32, exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, dh: int) -> torch.Tensor:
    """words [..., W] int32 -> codes [..., Dh] int32.

    Reads the words as little-endian bytes (code d is then at byte d * bits // 8, bit offset
    d * bits % 8): uint8 shifts by a constant vectorise far better on CPU than int32 shifts by a
    broadcast tensor, and 8-bit codes need no shift at all.
    """
    by = words.contiguous().view(torch.uint8)  # [..., 4W], little-endian (checked at import)
    if bits == 8:
        return by[..., :dh].to(torch.int32)
    mask = (1 << bits) - 1
    fields = [(by >> (i * bits)) & mask if i else by & mask for i in range(8 // bits)]
    return torch.stack(fields, dim=-1).flatten(-2)[..., :dh].to(torch.int32)


if sys.byteorder != "little":  # the byte view above assumes it (x86 and ARM both are)
    raise ImportError("kernels.kv_quant.reference needs a little-endian host")


def _grouped(x: torch.Tensor, rt: int, rc: int) -> torch.Tensor:
    """x [B, S, H, Dh] fp32 -> [B, S//rt, rt, H, Gc, rc] (channels padded with NaN to Gc * rc)."""
    b, s, h, dh = x.shape
    gc = -(-dh // rc)
    xp = torch.nn.functional.pad(x, (0, gc * rc - dh), value=float("nan"))
    return xp.view(b, s // rt, rt, h, gc, rc)


def quantize_codes(x: torch.Tensor, bits: int, rt: int, rc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, S, H, Dh] -> (codes [B, S, H, Dh] int32, scale, zero [B, S//rt, H, ceil(Dh/rc)] fp32)."""
    b, s, h, dh = x.shape
    xg = _grouped(x.float(), rt, rc)
    lo = xg.nan_to_num(nan=float("inf")).amin(dim=(2, 5))  # [B, S//rt, H, Gc]
    hi = xg.nan_to_num(nan=float("-inf")).amax(dim=(2, 5))
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    lo_e, inv_e = lo[:, :, None, :, :, None], inv[:, :, None, :, :, None]
    codes = torch.round(torch.clamp((xg - lo_e) * inv_e, 0, qmax)).nan_to_num_(0.0)
    codes = codes.view(b, s, h, -1)[..., :dh].to(torch.int32)
    return codes, scale, lo


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rt: int, rc: int) -> torch.Tensor:
    """codes [B, S, H, Dh] -> x_hat [B, S, H, Dh] fp32 = code * scale + min of its group."""
    b, s, h, dh = codes.shape
    if dh % rc == 0 and s % rt == 0:  # broadcast the group statistics instead of materialising them
        c = codes.view(b, s // rt, rt, h, dh // rc, rc).float()
        return (c * scale[:, :, None, :, :, None] + zero[:, :, None, :, :, None]).view(b, s, h, dh)
    sc = scale.repeat_interleave(rt, dim=1).repeat_interleave(rc, dim=3)[..., :dh]
    zr = zero.repeat_interleave(rt, dim=1).repeat_interleave(rc, dim=3)[..., :dh]
    return codes.float() * sc + zr


def quantize_pack(x: torch.Tensor, bits: int, mode: str = "per_token", role: str = "k", group: int = 32) -> PackedKV:
    """x [B, S, H, Dh] (K or V after RoPE) -> PackedKV (layout in the module docstring)."""
    validate(bits, mode, role, group)
    if x.dim() != 4:
        raise ValueError(f"quantize_pack: x must be [B, S, H, Dh], got shape {tuple(x.shape)}")
    dh = x.shape[-1]
    rt, rc = group_shape(mode, role, dh, group)
    if x.shape[1] % rt:
        raise ValueError(f"quantize_pack: KIVI keys need S % G == 0, got S={x.shape[1]}, G={rt}")
    codes, scale, zero = quantize_codes(x, bits, rt, rc)
    return PackedKV(pack_codes(codes, bits), scale, zero, bits, dh, rt, rc)


def unpack_dequantize(p: PackedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PackedKV -> x_hat [B, S, H, Dh] in `dtype`."""
    codes = unpack_codes(p.codes, p.bits, p.dh)
    return dequantize_codes(codes, p.scale, p.zero, p.rt, p.rc).to(dtype)


def fake_quantize(
    x: torch.Tensor, bits: int, mode: str = "per_token", role: str = "k", group: int = 32
) -> torch.Tensor:
    """x [B, S, H, Dh] -> x_hat, same shape and dtype; equals unpack_dequantize(quantize_pack(x))."""
    validate(bits, mode, role, group)
    rt, rc = group_shape(mode, role, x.shape[-1], group)
    if x.shape[1] % rt:
        raise ValueError(f"fake_quantize: KIVI keys need S % G == 0, got S={x.shape[1]}, G={rt}")
    codes, scale, zero = quantize_codes(x, bits, rt, rc)
    return dequantize_codes(codes, scale, zero, rt, rc).to(x.dtype)
