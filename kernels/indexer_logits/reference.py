"""Lightning-indexer logits, pure PyTorch (ground truth and CPU path).

I[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s])   where k_pos[b, s] <= q_pos[b, t]
and k_pos[b, s] >= 0, and -inf elsewhere. Computed in query chunks so the [T, Hi, S] score tensor
is never materialised: the largest intermediate is [B, chunk, Hi, S]. The backward recomputes
each chunk instead of keeping the scores alive, so training memory is bounded the same way.
"""

from __future__ import annotations

import torch

# Largest intermediate (elements) one query chunk may allocate: 2^24 fp32 = 64 MiB.
DEFAULT_BUDGET = 1 << 24


def default_chunk(b: int, t: int, hi: int, s: int, budget: int = DEFAULT_BUDGET) -> int:
    """Query-chunk length so that b * chunk * hi * s <= budget (at least 1 query)."""
    return max(1, min(t, budget // max(1, b * hi * s)))


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, T, S] bool, True where key s is visible to query t (0 <= k_pos <= q_pos)."""
    kp = k_pos[:, None, :]
    return (kp <= q_pos[:, :, None]) & (kp >= 0)


def _chunk_scores(qc: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
    """qc [B, c, Hi, Di] fp32, kf [B, S, Di] fp32 -> raw scores [B, c, Hi, S]."""
    b, c, hi, di = qc.shape
    return torch.bmm(qc.reshape(b, c * hi, di), kf.transpose(1, 2)).view(b, c, hi, -1)


def _forward(q, k, w, q_pos, k_pos, chunk):
    b, t, hi, _ = q.shape
    s = k.shape[1]
    out = torch.empty(b, t, s, dtype=torch.float32, device=q.device)
    kf = k.float()
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        sc = _chunk_scores(q[:, t0:t1].float(), kf).relu_()  # [B, c, Hi, S]
        logit = torch.matmul(w[:, t0:t1].float().unsqueeze(2), sc).squeeze(2)  # [B, c, S]
        out[:, t0:t1] = logit.masked_fill_(~causal_mask(q_pos[:, t0:t1], k_pos), float("-inf"))
    return out


class _IndexerLogitsRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, q_pos, k_pos, chunk):
        ctx.save_for_backward(q, k, w, q_pos, k_pos)
        ctx.chunk = chunk
        return _forward(q, k, w, q_pos, k_pos, chunk)

    @staticmethod
    def backward(ctx, g):
        q, k, w, q_pos, k_pos = ctx.saved_tensors
        chunk = ctx.chunk
        b, t, hi, di = q.shape
        kf = k.float()
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dw = torch.empty(w.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
        for t0 in range(0, t, chunk):
            t1 = min(t, t0 + chunk)
            qc = q[:, t0:t1].float()
            gc = g[:, t0:t1].float().masked_fill(~causal_mask(q_pos[:, t0:t1], k_pos), 0.0)  # [B, c, S]
            sc = _chunk_scores(qc, kf)  # [B, c, Hi, S]
            pos = sc > 0
            r = sc.relu_()
            dw[:, t0:t1] = torch.matmul(r, gc.unsqueeze(-1)).squeeze(-1)  # [B, c, Hi]
            ds = (gc.unsqueeze(2) * w[:, t0:t1].float().unsqueeze(-1)).mul_(pos)  # [B, c, Hi, S]
            c = t1 - t0
            ds2 = ds.view(b, c * hi, -1)
            dq[:, t0:t1] = torch.bmm(ds2, kf).view(b, c, hi, di)
            dk += torch.bmm(ds2.transpose(1, 2), qc.reshape(b, c * hi, di))
        return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype), None, None, None


def indexer_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """q [B, T, Hi, Di], k [B, S, Di], w [B, T, Hi], q_pos [B, T], k_pos [B, S] -> [B, T, S] fp32.

    `chunk` queries are processed at a time (default: fits DEFAULT_BUDGET elements).
    Differentiable in q, k and w (chunked recomputation in the backward).
    """
    if chunk is None:
        chunk = default_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[1])
    return _IndexerLogitsRef.apply(q, k, w, q_pos, k_pos, int(chunk))


def indexer_logits_naive(q, k, w, q_pos, k_pos) -> torch.Tensor:
    """The unchunked formulation (materialises [B, T, Hi, S]); benchmarks and tests only."""
    sc = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu()
    out = torch.einsum("bths,bth->bts", sc, w.float())
    return out.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
