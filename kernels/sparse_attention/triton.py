"""Sparse attention over top-k indices in Triton: forward (online softmax) and backward, GQA.

One program per (query t, key/value head n, batch b) handles the G = H // Hkv query heads that
share head n, so each gathered key/value row is loaded once per group. The forward walks the
K indices in blocks with an online softmax and saves the log-sum-exp; the backward recomputes
the probabilities from it, writes dq directly and scatters dk/dv with fp32 atomic adds (a key
chosen by many queries receives from all of them; the summation order is not deterministic).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_K = 16


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, T, KI, G, DH, scale,
    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, si_b, si_t, so_b, so_t, so_h,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t, n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < G, d < DH
    heads = n * G + g
    q = tl.load(
        q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0
    )
    q = q.to(tl.float32) * scale
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, KI, BLOCK_K):
        ko = k0 + tl.arange(0, BLOCK_K)
        ix = tl.load(idx_ptr + b * si_b + t * si_t + ko, mask=ko < KI, other=-1)
        valid = ix >= 0
        rows = b * sk_b + ix * sk_s + n * sk_h
        kv_mask = valid[:, None] & dm[None, :]
        kb = tl.load(k_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        vb = tl.load(v_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        sc = tl.sum(q[:, None, :] * kb[None, :, :], axis=2)  # [BG, BK]
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
        m = m_new
    has = den > 0
    out = tl.where(has[:, None], acc / tl.where(has, den, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * so_b + t * so_t + heads[:, None] * so_h + d[None, :], out, mask=gm[:, None] & dm[None, :])
    lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("inf"))  # +inf: p = 0 in backward
    tl.store(lse_ptr + (b * T + t) * (G * tl.num_programs(1)) + heads, lse, mask=gm)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, T, KI, G, DH, scale,
    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, si_b, si_t,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t, n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < G, d < DH
    heads = n * G + g
    qo = b * sq_b + t * sq_t + heads[:, None] * sq_h + d[None, :]
    qmask = gm[:, None] & dm[None, :]
    q = tl.load(q_ptr + qo, mask=qmask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + qo, mask=qmask, other=0.0).to(tl.float32)
    row = (b * T + t) * (G * tl.num_programs(1)) + heads
    lse = tl.load(lse_ptr + row, mask=gm, other=float("inf"))
    delta = tl.load(delta_ptr + row, mask=gm, other=0.0)
    dq = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, KI, BLOCK_K):
        ko = k0 + tl.arange(0, BLOCK_K)
        ix = tl.load(idx_ptr + b * si_b + t * si_t + ko, mask=ko < KI, other=-1)
        valid = ix >= 0
        rows = b * sk_b + ix * sk_s + n * sk_h
        kv_mask = valid[:, None] & dm[None, :]
        kb = tl.load(k_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        vb = tl.load(v_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        sc = tl.sum(q[:, None, :] * kb[None, :, :], axis=2) * scale  # [BG, BK]
        p = tl.where(valid[None, :] & gm[:, None], tl.exp(sc - lse[:, None]), 0.0)
        dp = tl.sum(do[:, None, :] * vb[None, :, :], axis=2)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.sum(ds[:, :, None] * kb[None, :, :], axis=1)
        tl.atomic_add(dk_ptr + rows[:, None] + d[None, :], tl.sum(ds[:, :, None] * q[:, None, :], axis=0), mask=kv_mask)
        tl.atomic_add(dv_ptr + rows[:, None] + d[None, :], tl.sum(p[:, :, None] * do[:, None, :], axis=0), mask=kv_mask)
    tl.store(dq_ptr + qo, dq, mask=qmask)


def _meta(g: int, dh: int) -> dict:
    return dict(BLOCK_G=triton.next_power_of_2(g), BLOCK_K=BLOCK_K, BLOCK_D=triton.next_power_of_2(dh))


def sparse_attention_fwd(q, k, v, idx, scale):
    """q [B,T,H,Dh], k/v [B,S,Hkv,Dh], idx [B,T,K] -> (out [B,T,H,Dh] in q.dtype, lse [B,T,H] fp32)."""
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous().to(torch.int64)
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, t, h, dtype=torch.float32, device=q.device)
    _fwd_kernel[(t, hkv, b)](
        q, k, v, idx, out, lse, t, idx.shape[2], h // hkv, dh, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), out.stride(2),
        **_meta(h // hkv, dh),
    )  # fmt: skip
    return out.to(q.dtype), lse


def sparse_attention_bwd(q, k, v, idx, out, lse, do, scale):
    """Gradients (dq, dk, dv) in fp32 for upstream do [B, T, H, Dh]."""
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous().to(torch.int64)
    do = do.contiguous()
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    delta = (out.float() * do.float()).sum(-1).contiguous()  # [B, T, H]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    _bwd_kernel[(t, hkv, b)](
        q, k, v, idx, do, lse, delta, dq, dk, dv, t, idx.shape[2], h // hkv, dh, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        idx.stride(0), idx.stride(1),
        **_meta(h // hkv, dh),
    )  # fmt: skip
    return dq, dk, dv


class SparseAttention(torch.autograd.Function):
    """autograd wrapper: forward and backward both in Triton."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale):
        out, lse = sparse_attention_fwd(q, k, v, idx, scale)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, out, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, do, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def sparse_attention(q, k, v, idx, scale=None) -> torch.Tensor:
    """Triton path of kernels.sparse_attention (same contract)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return SparseAttention.apply(q, k, v, idx, scale)
