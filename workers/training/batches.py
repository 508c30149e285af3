"""Training batches, a pure function of (seed, step, rank) so a resumed run sees the same data."""

from __future__ import annotations

import torch

from workers.data.retrieval import RetrievalConfig, make_batch

from .config import TrainConfig


def _generator(tc: TrainConfig, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((tc.seed * 1_000_003 + step) * 1009 + rank)


def text_batch(tokens: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """n random windows [n, length] from a token stream [M]."""
    starts = torch.randint(0, tokens.numel() - length, (n,), generator=g)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def train_batch(tc: TrainConfig, step: int, rank: int, tokens: torch.Tensor, filler: bytes) -> torch.Tensor:
    """The batch [batch_size, L] of one worker at one step (L = seq_len, or curriculum_len in stage 1)."""
    g = _generator(tc, step, rank)
    if tc.task == "text":
        return text_batch(tokens, tc.batch_size, tc.seq_len, g)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    if step < tc.curriculum_steps:
        cfg = RetrievalConfig(length=tc.curriculum_len, min_records=2, max_records=4, max_queries=2)
        return make_batch(filler, cfg, tc.batch_size, seed)[0]
    n_ret = round(tc.batch_size * tc.retrieval_frac)
    cfg = RetrievalConfig(length=tc.seq_len, min_records=4, max_records=8, max_queries=tc.max_queries)
    parts = []
    if n_ret:
        parts.append(make_batch(filler, cfg, n_ret, seed)[0])
    if tc.batch_size - n_ret:
        parts.append(text_batch(tokens, tc.batch_size - n_ret, tc.seq_len, g))
    return torch.cat(parts)
