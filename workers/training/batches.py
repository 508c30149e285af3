"""Training batches, a pure function of (seed, step, rank) so a resumed run sees the same data."""

from __future__ import annotations

import torch

from workers.data.retrieval import VALUE_LEN, RetrievalConfig, make_batch
from workers.training.config import TrainConfig


def _generator(tc: TrainConfig, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((tc.seed * 1_000_003 + step) * 1009 + rank)


def text_batch(tokens: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """n random windows [n, length] from a token stream [M]."""
    starts = torch.randint(0, tokens.numel() - length, (n,), generator=g)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def answer_weights(x: torch.Tensor, answers: list[list[int]], weight: float, base: float = 1.0) -> torch.Tensor:
    """Per-prediction loss weights [n, L-1]: ``weight`` on the predictions of retrieval answer bytes,
    ``base`` elsewhere."""
    w = torch.full((x.shape[0], x.shape[1] - 1), base)
    for i, offsets in enumerate(answers):
        for off in offsets:
            w[i, off - 1 : off - 1 + VALUE_LEN] = weight
    return w


def weighted_batch(
    tc: TrainConfig, step: int, rank: int, tokens: torch.Tensor, filler: bytes
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch [batch_size, L] of one worker at one step and its loss weights [batch_size, L-1] (None = uniform).

    L = seq_len, or the stage's length during the retrieval curriculum, whose stages train the
    answer bytes only (the circuit that finds a record forms far faster without the text loss).
    After it, retrieval answer bytes carry ``answer_weight``: they are 3 of ~64 bytes.
    """
    g = _generator(tc, step, rank)
    if tc.task == "text":
        return text_batch(tokens, tc.batch_size, tc.seq_len, g), None
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    stage = tc.stage_at(step)
    if stage is not None:
        pad = b" " * (4 * stage.length) if stage.filler == "blank" else filler
        x, ans = make_batch(pad, stage.retrieval_config(), tc.batch_size, seed)
        return x, answer_weights(x, ans, 1.0, base=0.0)
    n_ret = round(tc.batch_size * tc.retrieval_frac)
    cfg = RetrievalConfig(length=tc.seq_len, min_records=4, max_records=8, max_queries=tc.max_queries)
    xs, ws = [], []
    if n_ret:
        x, ans = make_batch(filler, cfg, n_ret, seed)
        xs.append(x)
        ws.append(answer_weights(x, ans, tc.answer_weight))
    if tc.batch_size - n_ret:
        x = text_batch(tokens, tc.batch_size - n_ret, tc.seq_len, g)
        xs.append(x)
        ws.append(torch.ones(x.shape[0], x.shape[1] - 1))
    return torch.cat(xs), torch.cat(ws)


def train_batch(tc: TrainConfig, step: int, rank: int, tokens: torch.Tensor, filler: bytes) -> torch.Tensor:
    """The batch [batch_size, L] of one worker at one step (see ``weighted_batch``)."""
    return weighted_batch(tc, step, rank, tokens, filler)[0]
