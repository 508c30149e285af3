"""Attention received per key, pure PyTorch (ground truth and CPU path), for PrefixKV.

score[b, s] = mean_h sum_t softmax_s(q[b,t,h] . k[b,s,h // G] / sqrt(Dh))  over visible keys
(0 <= k_pos <= q_pos). Computed in query chunks so the [T, H, S] probability map is never
held: the largest intermediate is [B, chunk, H, S]. Queries that see no key add nothing.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BUDGET = 1 << 24


def default_chunk(b: int, t: int, h: int, s: int, budget: int = DEFAULT_BUDGET) -> int:
    """Query-chunk length so that b * chunk * h * s <= budget (at least 1 query)."""
    return max(1, min(t, budget // max(1, b * h * s)))


@torch.no_grad()
def attention_received(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """q [B, T, H, Dh], k [B, S, Hkv, Dh], q_pos [B, T], k_pos [B, S] -> [B, S] fp32."""
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    if chunk is None:
        chunk = default_chunk(b, t, h, s)
    scale = 1.0 / math.sqrt(dh)
    kt = k.float().permute(0, 2, 3, 1)  # [B, Hkv, Dh, S]
    out = torch.zeros(b, s, dtype=torch.float32, device=q.device)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        qc = q[:, t0:t1].float().view(b, t1 - t0, hkv, g, dh).permute(0, 2, 1, 3, 4)  # [B, Hkv, c, G, Dh]
        sc = torch.matmul(qc.reshape(b, hkv, -1, dh), kt).mul_(scale)  # [B, Hkv, c*G, S]
        sc = sc.view(b, hkv, t1 - t0, g, s)
        kp = k_pos[:, None, :]
        vis = (kp <= q_pos[:, t0:t1, None]) & (kp >= 0)  # [B, c, S]
        sc.masked_fill_(~vis[:, None, :, None, :], float("-inf"))
        p = torch.softmax(sc, dim=-1).nan_to_num_(0.0)  # rows with no visible key -> 0
        out += p.sum(dim=(1, 2, 3))
    return out / h
