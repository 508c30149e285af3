"""Lightning-indexer logits in Triton: forward and backward, tiled over (queries, keys).

Each program owns a [BT, BS] tile of the output and loops over the Hi indexer heads, so the
[T, Hi, S] score tensor never exists outside registers; the backward recomputes the scores
tile by tile (one kernel for dq/dw over query tiles, one for dk over key tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BT, BS = 16, 16


@triton.jit
def _visible(qp_ptr, kp_ptr, t_offs, s_offs, T, S):
    qp = tl.load(qp_ptr + t_offs, mask=t_offs < T, other=-1)
    kp = tl.load(kp_ptr + s_offs, mask=s_offs < S, other=-1)
    return (kp[None, :] <= qp[:, None]) & (kp[None, :] >= 0) & (qp[:, None] >= 0)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, w_ptr, qp_ptr, kp_ptr, o_ptr, T, S, HI, DI,
    sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, so_b, so_t,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    s_offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    tm, sm, dm = t_offs < T, s_offs < S, d < DI
    k = tl.load(k_ptr + b * sk_b + s_offs[:, None] * sk_s + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    k = k.to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for h in range(HI):
        q = tl.load(
            q_ptr + b * sq_b + t_offs[:, None] * sq_t + h * sq_h + d[None, :],
            mask=tm[:, None] & dm[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(w_ptr + b * sw_b + t_offs * sw_t + h, mask=tm, other=0.0).to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        acc += w[:, None] * tl.maximum(sc, 0.0)
    vis = _visible(qp_ptr + b * T, kp_ptr + b * S, t_offs, s_offs, T, S)
    acc = tl.where(vis, acc, float("-inf"))
    tl.store(o_ptr + b * so_b + t_offs[:, None] * so_t + s_offs[None, :], acc, mask=tm[:, None] & sm[None, :])


@triton.jit
def _bwd_q_kernel(
    q_ptr, k_ptr, w_ptr, qp_ptr, kp_ptr, g_ptr, dq_ptr, dw_ptr, T, S, HI, DI,
    sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, sg_b, sg_t,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t, b = tl.program_id(0), tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tm, dm = t_offs < T, d < DI
    for h in range(HI):
        q = tl.load(
            q_ptr + b * sq_b + t_offs[:, None] * sq_t + h * sq_h + d[None, :],
            mask=tm[:, None] & dm[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(w_ptr + b * sw_b + t_offs * sw_t + h, mask=tm, other=0.0).to(tl.float32)
        dq = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dw = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s_offs = s0 + tl.arange(0, BLOCK_S)
            sm = s_offs < S
            k = tl.load(
                k_ptr + b * sk_b + s_offs[:, None] * sk_s + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0
            ).to(tl.float32)
            vis = _visible(qp_ptr + b * T, kp_ptr + b * S, t_offs, s_offs, T, S)
            g = tl.load(g_ptr + b * sg_b + t_offs[:, None] * sg_t + s_offs[None, :], mask=vis, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            dw += tl.sum(g * tl.maximum(sc, 0.0), axis=1)
            ds = tl.where(sc > 0, g * w[:, None], 0.0)
            dq += tl.dot(ds, k, input_precision="ieee")
        tl.store(dq_ptr + b * sq_b + t_offs[:, None] * sq_t + h * sq_h + d[None, :], dq, mask=tm[:, None] & dm[None, :])
        tl.store(dw_ptr + b * sw_b + t_offs * sw_t + h, dw, mask=tm)


@triton.jit
def _bwd_k_kernel(
    q_ptr, k_ptr, w_ptr, qp_ptr, kp_ptr, g_ptr, dk_ptr, T, S, HI, DI,
    sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, sg_b, sg_t,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_s, b = tl.program_id(0), tl.program_id(1)
    s_offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm, dm = s_offs < S, d < DI
    k = tl.load(k_ptr + b * sk_b + s_offs[:, None] * sk_s + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    k = k.to(tl.float32)
    dk = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        tm = t_offs < T
        vis = _visible(qp_ptr + b * T, kp_ptr + b * S, t_offs, s_offs, T, S)
        g = tl.load(g_ptr + b * sg_b + t_offs[:, None] * sg_t + s_offs[None, :], mask=vis, other=0.0)
        for h in range(HI):
            q = tl.load(
                q_ptr + b * sq_b + t_offs[:, None] * sq_t + h * sq_h + d[None, :],
                mask=tm[:, None] & dm[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(w_ptr + b * sw_b + t_offs * sw_t + h, mask=tm, other=0.0).to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            ds = tl.where(sc > 0, g * w[:, None], 0.0)  # [BT, BS]
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(dk_ptr + b * sk_b + s_offs[:, None] * sk_s + d[None, :], dk, mask=sm[:, None] & dm[None, :])


def _block_d(di: int) -> int:
    return max(16, triton.next_power_of_2(di))


def indexer_logits_fwd(q, k, w, q_pos, k_pos) -> torch.Tensor:
    """q [B, T, Hi, Di], k [B, S, Di], w [B, T, Hi], q_pos [B, T], k_pos [B, S] -> [B, T, S] fp32."""
    q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
    q_pos, k_pos = q_pos.contiguous().to(torch.int64), k_pos.contiguous().to(torch.int64)
    b, t, hi, di = q.shape
    s = k.shape[1]
    out = torch.empty(b, t, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, BT), triton.cdiv(s, BS), b)
    _fwd_kernel[grid](
        q, k, w, q_pos, k_pos, out, t, s, hi, di,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_T=BT, BLOCK_S=BS, BLOCK_D=_block_d(di),
    )  # fmt: skip
    return out


def indexer_logits_bwd(q, k, w, q_pos, k_pos, g):
    """Gradients (dq [B,T,Hi,Di], dk [B,S,Di], dw [B,T,Hi]) in fp32 for upstream g [B, T, S]."""
    q, k, w, g = q.contiguous(), k.contiguous(), w.contiguous(), g.contiguous().float()
    q_pos, k_pos = q_pos.contiguous().to(torch.int64), k_pos.contiguous().to(torch.int64)
    b, t, hi, di = q.shape
    s = k.shape[1]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dw = torch.empty(w.shape, dtype=torch.float32, device=q.device)
    args = (t, s, hi, di, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1))
    args += (w.stride(0), w.stride(1), g.stride(0), g.stride(1))
    meta = dict(BLOCK_T=BT, BLOCK_S=BS, BLOCK_D=_block_d(di))
    _bwd_q_kernel[(triton.cdiv(t, BT), b)](q, k, w, q_pos, k_pos, g, dq, dw, *args, **meta)
    _bwd_k_kernel[(triton.cdiv(s, BS), b)](q, k, w, q_pos, k_pos, g, dk, *args, **meta)
    return dq, dk, dw


class IndexerLogits(torch.autograd.Function):
    """autograd wrapper: forward and backward both in Triton."""

    @staticmethod
    def forward(ctx, q, k, w, q_pos, k_pos):
        ctx.save_for_backward(q, k, w, q_pos, k_pos)
        return indexer_logits_fwd(q, k, w, q_pos, k_pos)

    @staticmethod
    def backward(ctx, g):
        q, k, w, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dw = indexer_logits_bwd(q, k, w, q_pos, k_pos, g)
        return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype), None, None


def indexer_logits(q, k, w, q_pos, k_pos) -> torch.Tensor:
    """Triton path of kernels.indexer_logits (same contract)."""
    return IndexerLogits.apply(q, k, w, q_pos, k_pos)
