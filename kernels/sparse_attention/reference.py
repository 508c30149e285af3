"""Sparse attention over per-query top-k key indices, pure PyTorch (ground truth and CPU path).

Every query t attends only to the keys idx[b, t, :] (shared by all heads; -1 entries skipped),
with grouped-query attention: query head h reads key/value head h // (H // Hkv). A query
with no valid index returns zeros. The gathered form costs O(T * K) instead of O(T * S) and
autograd differentiates it; `dense_masked_attention` is the O(T * S) oracle it must equal.
"""

from __future__ import annotations

import math

import torch

# Largest gathered key block (elements) one query chunk may allocate when no grad is needed.
DEFAULT_BUDGET = 1 << 24


def _gqa_split(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """q [B, T, H, Dh] -> [B, T, Hkv, G, Dh] with G = H // Hkv."""
    b, t, h, dh = q.shape
    return q.view(b, t, hkv, h // hkv, dh)


def _sparse_chunk(q, k, v, idx, scale):
    """q [B, c, H, Dh], k/v [B, S, Hkv, Dh], idx [B, c, K] -> [B, c, H, Dh].

    Keys and values are gathered as whole rows with index_select on a [B*Hkv*S, Dh] view (a
    row memcpy; much faster on CPU than advanced indexing), laid out [B, Hkv, c, K, Dh] so the
    G query heads of a group share one batched matmul.
    """
    b, c, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    valid = idx >= 0  # [B, c, K]
    base = (torch.arange(b, device=q.device)[:, None] * hkv + torch.arange(hkv, device=q.device)) * s  # [B, Hkv]
    rows = (base[:, :, None, None] + idx.clamp(min=0)[:, None]).reshape(-1)  # B*Hkv*c*K
    kg = k.transpose(1, 2).reshape(b * hkv * s, dh).index_select(0, rows).view(b, hkv, c, -1, dh)
    vg = v.transpose(1, 2).reshape(b * hkv * s, dh).index_select(0, rows).view(b, hkv, c, -1, dh)
    qg = q.view(b, c, hkv, h // hkv, dh).transpose(1, 2).float()  # [B, Hkv, c, G, Dh]
    sc = torch.matmul(qg, kg.float().transpose(-1, -2)) * scale  # [B, Hkv, c, G, K]
    sc = sc.masked_fill(~valid[:, None, :, None, :], float("-inf"))
    p = torch.softmax(sc, dim=-1)
    p = torch.where(valid.any(-1)[:, None, :, None, None], p, torch.zeros_like(p))
    o = torch.matmul(p, vg.float())  # [B, Hkv, c, G, Dh]
    return o.transpose(1, 2).reshape(b, c, h, dh).to(q.dtype)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q [B, T, H, Dh], k/v [B, S, Hkv, Dh], idx [B, T, K] int64 -> [B, T, H, Dh].

    `scale` defaults to 1/sqrt(Dh). Chunked over queries when no gradient is needed, so the
    gathered [B, chunk, K, Hkv, Dh] block stays under DEFAULT_BUDGET elements.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    b, t = q.shape[:2]
    per_query = b * idx.shape[-1] * k.shape[2] * k.shape[3]
    chunk = t if needs_grad else max(1, DEFAULT_BUDGET // max(1, per_query))
    if chunk >= t:
        return _sparse_chunk(q, k, v, idx, scale)
    return torch.cat(
        [_sparse_chunk(q[:, i : i + chunk], k, v, idx[:, i : i + chunk], scale) for i in range(0, t, chunk)],
        dim=1,
    )


def dense_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The oracle: dense attention over all S keys with a [B, T, S] mask built from idx.

    q [B, T, H, Dh], k/v [B, S, Hkv, Dh], idx [B, T, K] -> [B, T, H, Dh]; equals sparse_attention.
    """
    b, t, h, dh = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    mask = torch.zeros(b, t, s + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(2, torch.where(idx >= 0, idx, s), True)  # column s absorbs the -1 entries
    mask = mask[:, :, :s]
    return _dense(q, k, v, mask, scale)


def causal_attention(q, k, v, q_pos, k_pos, scale: float | None = None) -> torch.Tensor:
    """Dense causal attention by positions (the usual baseline): key s visible iff 0 <= k_pos <= q_pos.

    q [B, T, H, Dh], k/v [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, T, H, Dh].
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kp = k_pos[:, None, :]
    return _dense(q, k, v, (kp <= q_pos[:, :, None]) & (kp >= 0), scale)


def _dense(q, k, v, mask, scale):
    """Dense attention with a [B, T, S] bool mask; rows with no visible key return zeros."""
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    qg = _gqa_split(q, hkv).float()
    sc = torch.einsum("btngd,bsnd->btngs", qg, k.float()) * scale  # [B, T, Hkv, G, S]
    sc = sc.masked_fill(~mask[:, :, None, None, :], float("-inf"))
    p = torch.softmax(sc, dim=-1)
    p = torch.where(mask.any(-1)[:, :, None, None, None], p, torch.zeros_like(p))
    o = torch.einsum("btngs,bsnd->btngd", p, v.float())
    return o.reshape(b, t, h, dh).to(q.dtype)
