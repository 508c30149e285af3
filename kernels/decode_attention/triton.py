"""Decode attention over packed KV (kernels.kv_quant layout) + full-precision window, in Triton.

Split-K (flash-decoding): the packed slots are cut into NSPLIT ranges; one program per
(query t, kv head n, split) dequantizes its keys and values on the fly from the int32 words
(K_BITS and V_BITS are compile-time constants: one specialisation per (k_bits, v_bits)), runs
an online softmax for the G query heads of its kv head and writes a partial (max, sum, output).
The window is one more split, run by the same kernel with QUANT=False. The partials are merged
with a log-sum-exp on the host (a few [B, T, H, splits] tensors).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.kv_quant.reference import PackedKV

BLOCK_S = 16
SLOTS_PER_SPLIT = 256


@triton.jit
def _dequant_rows(c_ptr, s_ptr, z_ptr, rows, d, m2, sc_s, ss_s, RT, RC, BITS: tl.constexpr):
    """Rows [BS] of one (batch, head) base pointer -> fp32 [BS, BD] (zeros where masked)."""
    PER: tl.constexpr = 32 // BITS
    words = tl.load(c_ptr + rows[:, None] * sc_s + (d // PER)[None, :], mask=m2, other=0)
    codes = (words >> ((d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    go = (rows // RT)[:, None] * ss_s + (d // RC)[None, :]
    scale = tl.load(s_ptr + go, mask=m2, other=0.0)
    zero = tl.load(z_ptr + go, mask=m2, other=0.0)
    return codes.to(tl.float32) * scale + zero


@triton.jit
def _split_kernel(
    q_ptr, qp_ptr, pos_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, m_ptr, l_ptr, o_ptr,
    T, S, HKV, G, DH, scale, K_RT, K_RC, V_RT, V_RC, SPLIT_LEN, SPLIT_OFF, NSPLIT_ALL,
    sq_b, sq_t, sq_h, sp_b, skc_b, skc_s, skc_h, sks_b, sks_s, sks_h, svc_b, svc_s, svc_h, svs_b, svs_s, svs_h,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, QUANT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t, bn, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, n = bn // HKV, bn % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < G, d < DH
    heads = n * G + g
    q = tl.load(
        q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0
    )
    q = q.to(tl.float32) * scale
    qp = tl.load(qp_ptr + b * T + t)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    lo = sp * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, S)
    for s0 in range(lo, hi, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        rm = rows < hi
        pos = tl.load(pos_ptr + b * sp_b + rows, mask=rm, other=-1)
        vis = rm & (pos >= 0) & (pos <= qp)
        m2 = vis[:, None] & dm[None, :]
        kbase, vbase = b * skc_b + n * skc_h, b * svc_b + n * svc_h
        if QUANT:
            k = _dequant_rows(
                kc_ptr + kbase, ks_ptr + b * sks_b + n * sks_h, kz_ptr + b * sks_b + n * sks_h,
                rows, d, m2, skc_s, sks_s, K_RT, K_RC, K_BITS,
            )  # fmt: skip
            v = _dequant_rows(
                vc_ptr + vbase, vs_ptr + b * svs_b + n * svs_h, vz_ptr + b * svs_b + n * svs_h,
                rows, d, m2, svc_s, svs_s, V_RT, V_RC, V_BITS,
            )  # fmt: skip
        else:
            k = tl.load(kc_ptr + kbase + rows[:, None] * skc_s + d[None, :], mask=m2, other=0.0).to(tl.float32)
            v = tl.load(vc_ptr + vbase + rows[:, None] * svc_s + d[None, :], mask=m2, other=0.0).to(tl.float32)
        sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BG, BS]
        sc = tl.where(vis[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    row = ((b * T + t) * (HKV * G) + heads) * NSPLIT_ALL + SPLIT_OFF + sp
    tl.store(m_ptr + row, m, mask=gm)
    tl.store(l_ptr + row, den, mask=gm)
    tl.store(o_ptr + row[:, None] * DH + d[None, :], acc, mask=gm[:, None] & dm[None, :])


def _launch(q, q_pos, pos, k, v, parts, split_off, nsplit, split_len, scale, quant):
    b, t, h, dh = q.shape
    m_buf, l_buf, o_buf = parts
    hkv = (k.codes if quant else k).shape[2]
    s = pos.shape[1]
    if quant:
        kc, ks, kz, vc, vs, vz = k.codes, k.scale, k.zero, v.codes, v.scale, v.zero
        geo = (k.rt, k.rc, v.rt, v.rc)
        bits = (k.bits, v.bits)
    else:
        kc, ks, kz, vc, vs, vz = k, k, k, v, v, v
        geo, bits = (1, 1, 1, 1), (8, 8)
    _split_kernel[(t, b * hkv, nsplit)](
        q, q_pos, pos, kc, ks, kz, vc, vs, vz, m_buf, l_buf, o_buf,
        t, s, hkv, h // hkv, dh, scale, *geo, split_len, split_off, m_buf.shape[-1],
        q.stride(0), q.stride(1), q.stride(2), pos.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        K_BITS=bits[0], V_BITS=bits[1], QUANT=quant,
        BLOCK_G=triton.next_power_of_2(h // hkv), BLOCK_S=BLOCK_S, BLOCK_D=triton.next_power_of_2(dh),
    )  # fmt: skip


def decode_attention(q, k_packed: PackedKV, v_packed: PackedKV, packed_pos, k_win, v_win, win_pos, q_pos, scale=None):
    """Triton path of kernels.decode_attention (same contract)."""
    b, t, h, dh = q.shape
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    q, q_pos = q.contiguous(), q_pos.contiguous().to(torch.int64)
    kp = PackedKV(*(x.contiguous() for x in (k_packed.codes, k_packed.scale, k_packed.zero)), *_geo(k_packed))
    vp = PackedKV(*(x.contiguous() for x in (v_packed.codes, v_packed.scale, v_packed.zero)), *_geo(v_packed))
    packed_pos = packed_pos.contiguous().to(torch.int64)
    sq = kp.length
    nsplit = max(1, triton.cdiv(sq, SLOTS_PER_SPLIT))
    split_len = triton.cdiv(max(sq, 1), nsplit)
    has_win = k_win is not None and k_win.shape[1] > 0
    total = nsplit + int(has_win)
    m_buf = torch.full((b, t, h, total), float("-inf"), dtype=torch.float32, device=q.device)
    l_buf = torch.zeros(b, t, h, total, dtype=torch.float32, device=q.device)
    o_buf = torch.zeros(b, t, h, total, dh, dtype=torch.float32, device=q.device)
    parts = (m_buf, l_buf, o_buf)
    if sq > 0:
        _launch(q, q_pos, packed_pos, kp, vp, parts, 0, nsplit, split_len, scale, True)
    if has_win:
        kw, vw = k_win.contiguous(), v_win.contiguous()
        wp = win_pos.contiguous().to(torch.int64)
        _launch(q, q_pos, wp, kw, vw, parts, nsplit, 1, kw.shape[1], scale, False)
    m = m_buf.amax(-1, keepdim=True)
    w = torch.exp(m_buf - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))  # [B, T, H, splits]
    den = (l_buf * w).sum(-1)
    o = (o_buf * w[..., None]).sum(-2)
    o = torch.where(den[..., None] > 0, o / den.clamp_min(1e-30)[..., None], torch.zeros_like(o))
    return o.to(q.dtype)


def _geo(p: PackedKV) -> tuple[int, int, int, int]:
    return p.bits, p.dh, p.rt, p.rc
