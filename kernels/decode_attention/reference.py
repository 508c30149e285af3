"""Decode attention over a packed quantized KV cache plus its full-precision window, pure PyTorch.

The cache a query sees has two parts: `Sq` packed slots (kernels.kv_quant layout, the old
tokens) and `W` full-precision slots (the newest tokens, the KIVI residual window). Each slot
carries its absolute position; a slot is visible to query t iff 0 <= pos <= q_pos[t], so unfilled
capacity (pos = -1) and causality inside the window are both handled by positions. GQA: query
head h reads key/value head h // (H // Hkv).

Split-K: the packed part is processed in blocks of `block` slots, each dequantized on the fly
and reduced to (max, sum, partial output); the blocks and the window are combined with a
log-sum-exp merge, so the dequantized cache is never materialised whole (as in the kernel).
"""

from __future__ import annotations

import math

import torch

from kernels.kv_quant.reference import PackedKV, unpack_dequantize

# Elements of the largest per-block intermediate (dequantized K or V, or the scores).
DEFAULT_BUDGET = 1 << 22


def _partial(qg, k, v, vis, scale):
    """qg [B, T, Hkv, G, Dh] fp32, k/v [B, s, Hkv, Dh], vis [B, T, s] -> (m, l, o) of one block.

    m, l [B, T, Hkv, G] running max and sum of exp; o [B, T, Hkv, G, Dh] unnormalised output.
    """
    sc = torch.einsum("btngd,bsnd->btngs", qg, k.float()) * scale
    sc = sc.masked_fill(~vis[:, :, None, None, :], float("-inf"))
    m = sc.amax(-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(sc - m_safe[..., None])
    return m, p.sum(-1), torch.einsum("btngs,bsnd->btngd", p, v.float())


def _merge(acc, part):
    """Log-sum-exp merge of two (m, l, o) partial results."""
    if acc is None:
        return part
    m1, d1, o1 = acc
    m2, d2, o2 = part
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a1 = torch.exp(torch.where(torch.isfinite(m1), m1 - m_safe, torch.full_like(m1, -torch.inf)))
    a2 = torch.exp(torch.where(torch.isfinite(m2), m2 - m_safe, torch.full_like(m2, -torch.inf)))
    return m, d1 * a1 + d2 * a2, o1 * a1[..., None] + o2 * a2[..., None]


def _visible(q_pos, pos):
    p = pos[:, None, :]
    return (p <= q_pos[:, :, None]) & (p >= 0)


@torch.no_grad()
def decode_attention(
    q: torch.Tensor,
    k_packed: PackedKV,
    v_packed: PackedKV,
    packed_pos: torch.Tensor,
    k_win: torch.Tensor | None,
    v_win: torch.Tensor | None,
    win_pos: torch.Tensor | None,
    q_pos: torch.Tensor,
    scale: float | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """q [B, T, H, Dh], packed K/V with Sq slots, packed_pos [B, Sq], k_win/v_win [B, W, Hkv, Dh],
    win_pos [B, W], q_pos [B, T] -> [B, T, H, Dh] in q's dtype. A query that sees nothing gets 0.

    `block` packed slots are dequantized at a time; by default as many as keep the per-block
    intermediates under DEFAULT_BUDGET elements (few large blocks: fewer ops per decode step).
    """
    b, t, h, dh = q.shape
    hkv = k_packed.codes.shape[2]
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    qg = q.float().view(b, t, hkv, h // hkv, dh)
    sq = k_packed.length
    if block is None:
        block = max(1, DEFAULT_BUDGET // max(1, b * hkv * max(dh, t * (h // hkv))))
    step = max(block - block % max(k_packed.rt, v_packed.rt, 1), max(k_packed.rt, v_packed.rt))
    acc = None
    for s0 in range(0, sq, step):
        s1 = min(sq, s0 + step)
        kb = unpack_dequantize(k_packed.slice(s0, s1))
        vb = unpack_dequantize(v_packed.slice(s0, s1))
        acc = _merge(acc, _partial(qg, kb, vb, _visible(q_pos, packed_pos[:, s0:s1]), scale))
    if k_win is not None and k_win.shape[1] > 0:
        acc = _merge(acc, _partial(qg, k_win, v_win, _visible(q_pos, win_pos), scale))
    if acc is None:
        return torch.zeros_like(q)
    _, den, o = acc
    o = torch.where(den[..., None] > 0, o / den.clamp_min(1e-30)[..., None], torch.zeros_like(o))
    return o.reshape(b, t, h, dh).to(q.dtype)


def decode_attention_dense(q, k, v, k_pos, q_pos, scale: float | None = None) -> torch.Tensor:
    """Full-precision baseline: q [B, T, H, Dh], k/v [B, S, Hkv, Dh], k_pos [B, S] -> [B, T, H, Dh]."""
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    _, den, o = _partial(q.float().view(b, t, hkv, h // hkv, dh), k, v, _visible(q_pos, k_pos), scale)
    o = torch.where(den[..., None] > 0, o / den.clamp_min(1e-30)[..., None], torch.zeros_like(o))
    return o.reshape(b, t, h, dh).to(q.dtype)
