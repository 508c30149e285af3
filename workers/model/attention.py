"""Grouped-query attention with an optional DSA lightning indexer and top-k sparse attention.

Shape legend: B batch, T new tokens, S attended keys, H query heads, Hkv key/value heads,
Dh head dim, Hi indexer heads, Di indexer head dim, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import indexer_logits, sparse_attention, topk_indices
from workers.caches.protocol import KVView
from workers.model.config import IndexerConfig, ModelConfig
from workers.model.layers import apply_rope, rope_cos_sin

ATTN_MODES = ("auto", "dense", "sparse", "random")


@dataclass
class AttnContext:
    """Per-forward settings shared by all layers."""

    pos: torch.Tensor  # [B, T] true positions of the new tokens
    cos: torch.Tensor  # [B, T, Dh]
    sin: torch.Tensor
    mode: str = "dense"  # resolved: dense | sparse | random
    cache: object | None = None
    observer: Callable | None = None
    indexer_loss: bool = False
    random_seed: int = 0


class Indexer(nn.Module):
    """Lightning indexer: I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]), one key per token."""

    def __init__(self, d_model: int, cfg: IndexerConfig, rope_theta: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.rope_theta = rope_theta
        self.wq = nn.Linear(d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(d_model, cfg.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.head_dim)
        self.ww = nn.Linear(d_model, cfg.n_heads, bias=False)
        self.scale = cfg.n_heads**-0.5 * cfg.head_dim**-0.5

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        r = self.cfg.rope_dim
        if r == 0:
            return x
        cos, sin = rope_cos_sin(pos, r, self.rope_theta)
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def keys(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> indexer keys [B, T, Di]."""
        return self._rope(self.k_norm(self.wk(x)), pos)

    def queries(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (q [B, T, Hi, Di], w [B, T, Hi])."""
        B, T, _ = x.shape
        q = self._rope(self.wq(x).view(B, T, self.cfg.n_heads, self.cfg.head_dim), pos)
        return q, self.ww(x) * self.scale


def positions_to_indices(positions: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Map top-k *positions* [B, T, K] to indices into this layer's keys ``key_pos`` [B, S].

    Keys are kept in original order, so ``key_pos`` is ascending per row; a position this
    layer no longer holds (evicted) maps to -1.
    """
    B, T, K = positions.shape
    flat = positions.reshape(B, T * K)
    kp = key_pos.masked_fill(key_pos < 0, torch.iinfo(torch.long).max)
    idx = torch.searchsorted(kp.contiguous(), flat.clamp_min(0).contiguous())
    idx = idx.clamp_max(kp.shape[1] - 1)
    hit = (torch.gather(kp, 1, idx) == flat) & (flat >= 0)
    return torch.where(hit, idx, torch.full_like(idx, -1)).view(B, T, K)


def indices_to_positions(idx: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Top-k indices [B, T, K] into keys with positions [B, S] -> positions [B, T, K] (-1 kept)."""
    B, T, K = idx.shape
    pos = torch.gather(key_pos, 1, idx.clamp_min(0).view(B, T * K)).view(B, T, K)
    return torch.where(idx >= 0, pos, torch.full_like(pos, -1))


def dense_attention(q, k, v, q_pos, k_pos) -> torch.Tensor:
    """Causal-by-position attention. q [B,T,H,Dh], k/v [B,S,Hkv,Dh] -> [B,T,H,Dh]."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B, T, S]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def head_summed_probs(q, k, q_pos, k_pos, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Main attention distribution summed over heads and L1-normalised (the indexer's target).

    Dense: [B, T, S]. With idx [B, T, K]: restricted to the selected keys, [B, T, K].
    """
    B, T, H, Dh = q.shape
    rep = H // k.shape[2]
    kk = k.repeat_interleave(rep, dim=2) if rep > 1 else k
    if idx is None:
        scores = torch.einsum("bthd,bshd->bhts", q.float(), kk.float()) * Dh**-0.5
        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    else:
        K = idx.shape[-1]
        g = torch.gather(kk, 1, idx.clamp_min(0).view(B, T * K, 1, 1).expand(-1, -1, H, Dh)).view(B, T, K, H, Dh)
        scores = torch.einsum("bthd,btkhd->bhtk", q.float(), g.float()) * Dh**-0.5
        scores = scores.masked_fill((idx < 0)[:, None], float("-inf"))
    p = scores.softmax(-1).sum(1)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-9)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.indexer = Indexer(cfg.d_model, cfg.indexer, cfg.rope_theta) if cfg.indexer else None
        self.topk = cfg.indexer.topk if cfg.indexer else 0
        self.indexer_calls = 0  # counted so tests/benchmarks can check S layers skip the indexer

    def forward(
        self, x: torch.Tensor, ctx: AttnContext, is_full: bool, index_buffer: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [B, T, D] -> (out [B, T, D], index_buffer [B, T, K] of positions, indexer KL or None)."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), ctx.cos, ctx.sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        use_indexer = ctx.mode == "sparse" and is_full and self.indexer is not None
        # The indexer sees a detached input: its KL loss trains only the indexer (DSA recipe).
        xi = x.detach()
        need_keys = self.indexer is not None and is_full and (ctx.mode == "sparse" or ctx.indexer_loss)
        idx_k = self.indexer.keys(xi, ctx.pos) if need_keys else None
        view = (
            ctx.cache.update(self.layer, k, v, ctx.pos, idx_k)
            if ctx.cache is not None
            else KVView(k, v, ctx.pos, idx_k)
        )
        if ctx.observer is not None:
            ctx.observer(self.layer, q, view.k, ctx.pos, view.pos)

        kl = None
        if ctx.mode == "dense":
            # A packed cache's decode step attends its codes directly (workers.caches.packed_view);
            # an observer reads the keys, so then the view is read as tensors.
            fused = getattr(view, "fused_attend", None) if ctx.observer is None else None
            out = fused(q, ctx.pos) if fused is not None else None
            if out is None:
                out = dense_attention(q, view.k, view.v, ctx.pos, view.pos)
            if ctx.indexer_loss and self.indexer is not None and is_full:
                kl = self._indexer_kl(xi, q, view, ctx, idx=None)
        else:
            if ctx.mode == "random":
                logits = random_logits(ctx.pos, view.pos, self.layer, ctx.random_seed)
                index_buffer = indices_to_positions(topk_indices(logits, self.topk), view.pos)
            elif use_indexer:
                self.indexer_calls += 1
                qi, w = self.indexer.queries(xi, ctx.pos)
                logits = indexer_logits(qi, view.idx_k, w, ctx.pos, view.pos)
                index_buffer = indices_to_positions(topk_indices(logits, self.topk), view.pos)
            elif index_buffer is None:
                raise RuntimeError(f"layer {self.layer} is S but no earlier F layer filled the index buffer")
            idx = positions_to_indices(index_buffer, view.pos)
            out = sparse_attention(q, view.k, view.v, idx)
            if ctx.indexer_loss and use_indexer:
                kl = self._indexer_kl(xi, q, view, ctx, idx=idx)
        return self.o_proj(out.reshape(B, T, -1)), index_buffer, kl

    def _indexer_kl(self, xi, q, view: KVView, ctx: AttnContext, idx) -> torch.Tensor:
        """KL(head-summed main attention || softmax(indexer logits)), averaged over queries."""
        with torch.no_grad():
            target = head_summed_probs(q.detach(), view.k.detach(), ctx.pos, view.pos, idx)
        qi, w = self.indexer.queries(xi, ctx.pos)
        logits = indexer_logits(qi, view.idx_k, w, ctx.pos, view.pos)  # [B, T, S]
        if idx is not None:
            logits = torch.gather(logits, 2, idx.clamp_min(0)).masked_fill(idx < 0, float("-inf"))
        return kl_to_target(target, logits)


def kl_to_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) averaged over queries: target, logits [B, T, S] (-inf = masked)."""
    logq = torch.log_softmax(logits, -1)
    term = target * (torch.log(target.clamp_min(1e-9)) - logq)
    term = torch.where(target > 0, term, torch.zeros_like(term))
    return term.sum(-1).mean()


def random_logits(pos: torch.Tensor, key_pos: torch.Tensor, layer: int, seed: int) -> torch.Tensor:
    """Random scores over earlier keys (the 'k random positions' baseline): pos [B, T], key_pos [B, S] -> [B, T, S]."""
    g = torch.Generator().manual_seed(seed * 1009 + layer)
    B, T = pos.shape
    r = torch.rand(B, T, key_pos.shape[1], generator=g).to(key_pos.device)
    ok = (key_pos[:, None, :] <= pos[:, :, None]) & (key_pos[:, None, :] >= 0)
    # The query's own position always stays: a token may always see itself.
    r = torch.where(key_pos[:, None, :] == pos[:, :, None], torch.full_like(r, 2.0), r)
    return r.masked_fill(~ok, float("-inf"))
