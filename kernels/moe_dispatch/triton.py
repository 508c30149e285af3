"""MoE dispatch in Triton: row gather (permute), grouped GEMM (experts), gated combine (unpermute).

Shape legend: N tokens, K experts per token, E experts, D model width, F expert hidden width,
M = N * K sorted rows. The routing bookkeeping (stable argsort by expert, bincount) stays
in torch; the data movement and the matmuls are kernels:
- `_gather_rows` / `_scatter_add_rows`: permute forward / backward (fp32 atomic adds, since a
  token's K copies all flow back into its one row).
- `_grouped_mm_kernel`: out[rows of e] = a[rows of e] @ w[e] over a host-built tile map (each
  tile of BLOCK_M rows belongs to one expert); weights are read through strides, so the
  backward reuses it with w[e] transposed.
- `_grouped_wgrad_kernel`: dw[e] = a[rows of e]^T @ b[rows of e].
- `_combine_kernel` / `_combine_bwd_kernel`: the gate-weighted sum of a token's K rows and its
  gradients (each sorted row is written by exactly one token: no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BM, BN, BK = 16, 32, 32
BD = 64


@triton.jit
def _gather_rows(x_ptr, src_ptr, o_ptr, D, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    src = tl.load(src_ptr + i)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(o_ptr + i * D + d, tl.load(x_ptr + src * D + d, mask=d < D), mask=d < D)


@triton.jit
def _scatter_add_rows(g_ptr, src_ptr, dx_ptr, D, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    src = tl.load(src_ptr + i)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.atomic_add(dx_ptr + src * D + d, tl.load(g_ptr + i * D + d, mask=d < D).to(tl.float32), mask=d < D)


@triton.jit
def _grouped_mm_kernel(
    a_ptr, w_ptr, o_ptr, tile_e_ptr, tile_r_ptr, ends_ptr, KD, ND, sw_e, sw_k, sw_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_e_ptr + tile)
    r0 = tl.load(tile_r_ptr + tile)
    end = tl.load(ends_ptr + e)
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, cm = rows < end, cols < ND
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < KD
        a = tl.load(a_ptr + rows[:, None] * KD + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(
            w_ptr + e * sw_e + kk[:, None] * sw_k + cols[None, :] * sw_n, mask=km[:, None] & cm[None, :], other=0.0
        )
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    tl.store(o_ptr + rows[:, None] * ND + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, o_ptr, ends_ptr, P, Q,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    e, pp, pq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.where(e > 0, tl.load(ends_ptr + e - 1, mask=e > 0, other=0), 0)
    end = tl.load(ends_ptr + e)
    ps = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        a = tl.load(a_ptr + rows[:, None] * P + ps[None, :], mask=rm[:, None] & (ps < P)[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * Q + qs[None, :], mask=rm[:, None] & (qs < Q)[None, :], other=0.0)
        acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
    tl.store(o_ptr + e * P * Q + ps[:, None] * Q + qs[None, :], acc, mask=(ps < P)[:, None] & (qs < Q)[None, :])


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, g_ptr, o_ptr, K, D, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(K):
            row = tl.load(inv_ptr + n * K + j)
            gate = tl.load(g_ptr + n * K + j).to(tl.float32)
            acc += gate * tl.load(y_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32)
        tl.store(o_ptr + n * D + d, acc, mask=d < D)


@triton.jit
def _combine_bwd_kernel(y_ptr, inv_ptr, g_ptr, do_ptr, dy_ptr, dg_ptr, K, D, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    for j in range(K):
        row = tl.load(inv_ptr + n * K + j)
        gate = tl.load(g_ptr + n * K + j).to(tl.float32)
        dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            do = tl.load(do_ptr + n * D + d, mask=d < D, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32)
            tl.store(dy_ptr + row * D + d, gate * do, mask=d < D)
            dgate += do * y
        tl.store(dg_ptr + n * K + j, tl.sum(dgate, axis=0))


class Permute(torch.autograd.Function):
    """x_sorted = x[src] with src = order // K; backward scatter-adds into x's rows."""

    @staticmethod
    def forward(ctx, x, src):
        x = x.contiguous()
        out = torch.empty(src.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        if src.numel():
            _gather_rows[(src.numel(),)](x, src, out, x.shape[1], BLOCK_D=BD)
        ctx.save_for_backward(src)
        ctx.n = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, g):
        (src,) = ctx.saved_tensors
        dx = torch.zeros(ctx.n, g.shape[1], dtype=torch.float32, device=g.device)
        if src.numel():
            _scatter_add_rows[(src.numel(),)](g.contiguous(), src, dx, g.shape[1], BLOCK_D=BD)
        return dx.to(g.dtype), None


def permute(x, expert_idx, n_experts):
    """Triton path of kernels.moe_dispatch.permute (same contract)."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return Permute.apply(x, (order // k).contiguous()), order, counts


def _tile_map(counts: torch.Tensor):
    """Tiles of BM rows, each inside one expert: (tile_expert [n_tiles], tile_row0 [n_tiles], ends [E])."""
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tiles = (counts + BM - 1) // BM
    tile_e = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    local = torch.arange(tile_e.numel(), device=counts.device) - first_tile[tile_e]
    return tile_e, starts[tile_e] + local * BM, ends


def grouped_mm(a, w, tmap, transpose_w=False) -> torch.Tensor:
    """a [M, Kd] sorted by expert, w [E, Kd, Nd] (or [E, Nd, Kd] read transposed) -> [M, Nd] fp32."""
    tile_e, tile_r, ends = tmap
    a = a.contiguous()
    kd = a.shape[1]
    nd = w.shape[1] if transpose_w else w.shape[2]
    sw_e, sw_k, sw_n = (w.stride(0), w.stride(2), w.stride(1)) if transpose_w else w.stride()
    out = torch.empty(a.shape[0], nd, dtype=torch.float32, device=a.device)
    if tile_e.numel():
        grid = (tile_e.numel(), triton.cdiv(nd, BN))
        _grouped_mm_kernel[grid](
            a, w, out, tile_e, tile_r, ends, kd, nd, sw_e, sw_k, sw_n, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK
        )
    return out


def grouped_wgrad(a, b, ends, n_experts) -> torch.Tensor:
    """a [M, P], b [M, Q] sorted by expert -> [E, P, Q] fp32, block e = a_e^T @ b_e."""
    a, b = a.contiguous(), b.contiguous()
    p, q = a.shape[1], b.shape[1]
    out = torch.empty(n_experts, p, q, dtype=torch.float32, device=a.device)
    grid = (n_experts, triton.cdiv(p, BN), triton.cdiv(q, BN))
    _grouped_wgrad_kernel[grid](a, b, out, ends, p, q, BLOCK_M=BM, BLOCK_P=BN, BLOCK_Q=BN)
    return out


class GroupedSwiGLU(torch.autograd.Function):
    """Rows of expert e: (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]; forward and backward."""

    @staticmethod
    def forward(ctx, x, counts, w_gate, w_up, w_down):
        tmap = _tile_map(counts)
        gate = grouped_mm(x, w_gate, tmap)  # [M, F]
        up = grouped_mm(x, w_up, tmap)
        h = F.silu(gate) * up
        y = grouped_mm(h, w_down, tmap)  # [M, D]
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up, *tmap)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, gate, up, *tmap = ctx.saved_tensors
        e = w_gate.shape[0]
        dy = dy.float()
        sig = torch.sigmoid(gate)
        silu = gate * sig
        h = silu * up
        dh = grouped_mm(dy, w_down, tmap, transpose_w=True)  # [M, F]
        dw_down = grouped_wgrad(h, dy, tmap[2], e)
        dgate = dh * up * sig * (1 + gate * (1 - sig))
        dup = dh * silu
        dx = grouped_mm(dgate, w_gate, tmap, transpose_w=True) + grouped_mm(dup, w_up, tmap, transpose_w=True)
        dw_gate = grouped_wgrad(x.float(), dgate, tmap[2], e)
        dw_up = grouped_wgrad(x.float(), dup, tmap[2], e)
        return (
            dx.to(x.dtype), None, dw_gate.to(w_gate.dtype), dw_up.to(w_up.dtype), dw_down.to(w_down.dtype)
        )  # fmt: skip


def grouped_swiglu(x_sorted, counts, w_gate, w_up, w_down):
    """Triton path of kernels.moe_dispatch.grouped_swiglu (same contract)."""
    return GroupedSwiGLU.apply(x_sorted, counts, w_gate, w_up, w_down)


class Unpermute(torch.autograd.Function):
    """out[n] = sum_j gates[n, j] * y_sorted[inv[n * K + j]] with inv the inverse of order."""

    @staticmethod
    def forward(ctx, y_sorted, order, gates):
        n, k = gates.shape
        y_sorted, gates = y_sorted.contiguous(), gates.contiguous()
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        out = torch.empty(n, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
        if n:
            _combine_kernel[(n,)](y_sorted, inv, gates, out, k, y_sorted.shape[1], BLOCK_D=BD)
        ctx.save_for_backward(y_sorted, inv, gates)
        return out.to(y_sorted.dtype)

    @staticmethod
    def backward(ctx, do):
        y_sorted, inv, gates = ctx.saved_tensors
        n, k = gates.shape
        dy = torch.empty(y_sorted.shape, dtype=torch.float32, device=do.device)
        dg = torch.empty(n, k, dtype=torch.float32, device=do.device)
        if n:
            _combine_bwd_kernel[(n,)](y_sorted, inv, gates, do.contiguous(), dy, dg, k, y_sorted.shape[1], BLOCK_D=BD)
        return dy.to(y_sorted.dtype), None, dg.to(gates.dtype)


def unpermute(y_sorted, order, gates):
    """Triton path of kernels.moe_dispatch.unpermute (same contract)."""
    return Unpermute.apply(y_sorted, order, gates)
