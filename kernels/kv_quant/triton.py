"""KV quantize + pack and unpack + dequantize in Triton (layout: kernels/kv_quant/reference.py).

One kernel per bit width: BITS is a compile-time constant, so the shifts, masks and the
codes-per-word count fold into the code. A quantize program owns one (token block, head):
for KIVI keys the block is exactly one group of G tokens and the statistics reduce over
tokens (per channel); otherwise each token reduces over its channel groups. Codes are
packed into uint32 words by shifting a [rows, W, 32 / BITS] view and summing (the fields
are disjoint, so the sum is a bitwise or). Rounding is half-to-even like torch.round, and
the division is correctly rounded (div_rn), so codes match the reference exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_quant.reference import PackedKV, group_shape, words_per_vector

BLOCK_T = 16


@triton.jit
def _round_half_even(x):
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _codes(x, lo, inv, QMAX: tl.constexpr):
    return _round_half_even(tl.minimum(tl.maximum((x - lo) * inv, 0.0), QMAX))


@triton.jit
def _quant_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, S, DH, RT, RC, NG, W,
    sx_b, sx_s, sx_h, sc_b, sc_s, sc_h, ss_b, ss_s, ss_h,
    BITS: tl.constexpr, TOKEN_GROUPED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 32 // BITS
    ar = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dm = d < DH
    if TOKEN_GROUPED:
        rows = pid * RT + ar
        rm = (ar < RT) & (rows < S)
    else:
        rows = pid * BLOCK_T + ar
        rm = rows < S
    m2 = rm[:, None] & dm[None, :]
    x = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_s + h * sx_h + d[None, :], mask=m2, other=0.0).to(tl.float32)
    if TOKEN_GROUPED:
        lo = tl.min(tl.where(m2, x, float("inf")), axis=0)  # [BD]: per channel over the G tokens
        hi = tl.max(tl.where(m2, x, float("-inf")), axis=0)
        lo, hi = tl.where(dm, lo, 0.0), tl.where(dm, hi, 0.0)
        scale = tl.div_rn(hi - lo, QMAX * 1.0)
        inv = tl.where(
            scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0)), 0.0
        )
        codes = _codes(x, lo[None, :], inv[None, :], QMAX)
        so = b * ss_b + pid * ss_s + h * ss_h + d
        tl.store(s_ptr + so, scale, mask=dm)
        tl.store(z_ptr + so, lo, mask=dm)
    else:
        lo_e = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        inv_e = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for gi in range(NG):
            cm = ((d // RC) == gi) & dm
            gm = rm[:, None] & cm[None, :]
            lo = tl.min(tl.where(gm, x, float("inf")), axis=1)  # [BT]: per token over the channel group
            hi = tl.max(tl.where(gm, x, float("-inf")), axis=1)
            lo, hi = tl.where(rm, lo, 0.0), tl.where(rm, hi, 0.0)
            scale = tl.div_rn(hi - lo, QMAX * 1.0)
            inv = tl.where(
                scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0)), 0.0
            )
            so = b * ss_b + rows * ss_s + h * ss_h + gi
            tl.store(s_ptr + so, scale, mask=rm)
            tl.store(z_ptr + so, lo, mask=rm)
            lo_e = tl.where(cm[None, :], lo[:, None], lo_e)
            inv_e = tl.where(cm[None, :], inv[:, None], inv_e)
        codes = _codes(x, lo_e, inv_e, QMAX)
    codes = tl.where(dm[None, :], codes, 0.0).to(tl.uint32)
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
    words = tl.sum(tl.reshape(codes, (BLOCK_T, BLOCK_D // PER, PER)) << shifts[None, None, :], axis=2)
    wo = tl.arange(0, BLOCK_D // PER)
    wmask = rm[:, None] & (wo[None, :] < W)
    tl.store(
        c_ptr + b * sc_b + rows[:, None] * sc_s + h * sc_h + wo[None, :], words.to(tl.int32, bitcast=True), mask=wmask
    )


@triton.jit
def _dequant_kernel(
    c_ptr, s_ptr, z_ptr, o_ptr, S, DH, RT, RC,
    sc_b, sc_s, sc_h, ss_b, ss_s, ss_h, so_b, so_s, so_h,
    BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    m2 = (rows < S)[:, None] & (d < DH)[None, :]
    words = tl.load(c_ptr + b * sc_b + rows[:, None] * sc_s + h * sc_h + (d // PER)[None, :], mask=m2, other=0)
    codes = (words >> ((d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    go = b * ss_b + (rows // RT)[:, None] * ss_s + h * ss_h + (d // RC)[None, :]
    scale = tl.load(s_ptr + go, mask=m2, other=0.0)
    zero = tl.load(z_ptr + go, mask=m2, other=0.0)
    x = codes.to(tl.float32) * scale + zero
    tl.store(o_ptr + b * so_b + rows[:, None] * so_s + h * so_h + d[None, :], x.to(o_ptr.dtype.element_ty), mask=m2)


def _block_d(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


def quantize_pack(x: torch.Tensor, bits: int, mode: str, role: str, group: int) -> PackedKV:
    """x [B, S, H, Dh] -> PackedKV; same contract as the reference (validated by the caller)."""
    x = x.contiguous()
    b, s, h, dh = x.shape
    rt, rc = group_shape(mode, role, dh, group)
    p = PackedKV.allocate(b, s, h, dh, bits, mode, role, group, device=x.device)
    token_grouped = rt > 1
    block_t = triton.next_power_of_2(rt) if token_grouped else BLOCK_T
    grid = (s // rt if token_grouped else triton.cdiv(s, BLOCK_T), h, b)
    if s == 0:
        return p
    _quant_kernel[grid](
        x, p.codes, p.scale, p.zero, s, dh, rt, rc, -(-dh // rc), words_per_vector(dh, bits),
        x.stride(0), x.stride(1), x.stride(2), p.codes.stride(0), p.codes.stride(1), p.codes.stride(2),
        p.scale.stride(0), p.scale.stride(1), p.scale.stride(2),
        BITS=bits, TOKEN_GROUPED=token_grouped, BLOCK_T=block_t, BLOCK_D=_block_d(dh),
    )  # fmt: skip
    return p


def unpack_dequantize(p: PackedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PackedKV -> x_hat [B, S, H, Dh] in `dtype`."""
    codes, scale, zero = p.codes.contiguous(), p.scale.contiguous(), p.zero.contiguous()
    b, s, h, _ = codes.shape
    out = torch.empty(b, s, h, p.dh, dtype=dtype, device=codes.device)
    if s == 0:
        return out
    _dequant_kernel[(triton.cdiv(s, BLOCK_T), h, b)](
        codes, scale, zero, out, s, p.dh, p.rt, p.rc,
        codes.stride(0), codes.stride(1), codes.stride(2), scale.stride(0), scale.stride(1), scale.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BITS=p.bits, BLOCK_T=BLOCK_T, BLOCK_D=_block_d(p.dh),
    )  # fmt: skip
    return out
