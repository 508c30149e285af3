"""Attention received per key in Triton, two passes, never holding the [T, S] map.

Pass 1, one program per (query block, head): the softmax log-normaliser (log-sum-exp over
visible keys) of each query, online over key blocks. Pass 2, one program per (key block,
head): walk the query blocks, recompute exp(score - lse) and sum it over queries. The
[B, H, S] per-head result is averaged over heads on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BT, BS = 16, 16


@triton.jit
def _scores(q_ptr, k_ptr, qp_ptr, kp_ptr, t_offs, s_offs, d, T, S, DH, sq_t, sk_s, scale):
    """[BT, BS] scaled scores of one head, -inf where invisible."""
    tm, sm, dm = t_offs < T, s_offs < S, d < DH
    q = tl.load(q_ptr + t_offs[:, None] * sq_t + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
    k = tl.load(k_ptr + s_offs[:, None] * sk_s + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    qp = tl.load(qp_ptr + t_offs, mask=tm, other=-1)
    kp = tl.load(kp_ptr + s_offs, mask=sm, other=-1)
    vis = (kp[None, :] <= qp[:, None]) & (kp[None, :] >= 0) & tm[:, None] & sm[None, :]
    return tl.where(vis, sc, float("-inf"))


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, qp_ptr, kp_ptr, lse_ptr, T, S, H, G, DH, scale, sq_b, sq_t, sq_h, sk_b, sk_s, sk_h,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t_offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        sc = _scores(
            q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + (h // G) * sk_h, qp_ptr + b * T, kp_ptr + b * S,
            t_offs, s_offs, d, T, S, DH, sq_t, sk_s, scale,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(sc - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(den > 0, m + tl.log(tl.where(den > 0, den, 1.0)), float("inf"))  # +inf: adds nothing
    tl.store(lse_ptr + bh * T + t_offs, lse, mask=t_offs < T)


@triton.jit
def _recv_kernel(
    q_ptr, k_ptr, qp_ptr, kp_ptr, lse_ptr, o_ptr, T, S, H, G, DH, scale, sq_b, sq_t, sq_h, sk_b, sk_s, sk_h,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    s_offs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        sc = _scores(
            q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + (h // G) * sk_h, qp_ptr + b * T, kp_ptr + b * S,
            t_offs, s_offs, d, T, S, DH, sq_t, sk_s, scale,
        )  # fmt: skip
        lse = tl.load(lse_ptr + bh * T + t_offs, mask=t_offs < T, other=float("inf"))
        acc += tl.sum(tl.exp(sc - lse[:, None]), axis=0)
    tl.store(o_ptr + bh * S + s_offs, acc, mask=s_offs < S)


def attention_received(q, k, q_pos, k_pos) -> torch.Tensor:
    """Triton path of kernels.attention_received: [B, T, H, Dh], [B, S, Hkv, Dh] -> [B, S] fp32."""
    q, k = q.contiguous(), k.contiguous()
    q_pos, k_pos = q_pos.contiguous().to(torch.int64), k_pos.contiguous().to(torch.int64)
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    lse = torch.empty(b * h, t, dtype=torch.float32, device=q.device)
    per_head = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    args = (t, s, h, h // hkv, dh, 1.0 / math.sqrt(dh), q.stride(0), q.stride(1), q.stride(2))
    args += (k.stride(0), k.stride(1), k.stride(2))
    meta = dict(BLOCK_T=BT, BLOCK_S=BS, BLOCK_D=max(16, triton.next_power_of_2(dh)))
    _lse_kernel[(triton.cdiv(t, BT), b * h)](q, k, q_pos, k_pos, lse, *args, **meta)
    _recv_kernel[(triton.cdiv(s, BS), b * h)](q, k, q_pos, k_pos, lse, per_head, *args, **meta)
    return per_head.mean(1)
