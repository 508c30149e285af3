"""Candidate evaluation for the IndexCache search on one calibration shard of a real model.

The model is a CalibLM or a transformers DSA model behind the same layer-level API
(`workers.model.hf.dsa.DSAModel`): embed, context, run_layers (index buffer in and out), head.

Shape legend: R calibration windows in the shard, B rows per batch, T tokens per window
(the model input; targets are the next T tokens), D model width, K top-k, N layers.

Two modes give identical losses (same ops on the same inputs, batch by batch):
- "prefix": for the committed pattern keep the hidden state entering every layer
  (`h_in[l]` [R, T, D]) and the index buffer entering every layer (`buf_in[l]` [R, T, K]);
  flipping layer l changes nothing before l, so a candidate reruns layers l..N-1 only.
  Committing layer c makes the cache stale from c on; it is refreshed lazily (layers
  c..N-1 over all rows) before the next evaluation, so a search's last commit costs nothing.
- "naive": every candidate runs the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tuning.indexcache.losses import LossSum
from tuning.indexcache.patterns import flip, validate_pattern
from workers.eval import token_nll


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL in float64 (exact to reduce over batches and shards).

    logits [B, T, V], targets [B, T].
    """
    return float(token_nll(logits, targets).double().sum()), targets.numel()


class ShardEvaluator:
    """Scores candidate flips of the committed pattern on one shard of calibration windows.

    `windows` [R, T + 1] int64: inputs are windows[:, :-1], targets windows[:, 1:].
    """

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 8, mode: str = "prefix"):
        if mode not in ("prefix", "naive"):
            raise ValueError(f"mode must be 'prefix' or 'naive', got {mode!r}")
        if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [R >= 1, T + 1 >= 2], got {tuple(windows.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.n_layers = len(model.layers)
        self.inputs, self.targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        self.batch_size, self.mode = batch_size, mode
        self.pattern = "F" * self.n_layers
        self.h_in: list[torch.Tensor | None] = [None] * self.n_layers
        self.buf_in: list[torch.Tensor | None] = [None] * self.n_layers
        self.stale_from: int | None = None
        self._units = 0
        self._ctx: dict[int, object] = {}  # batch size -> AttnContext (positions 0..T-1, RoPE tables)

    @property
    def n_rows(self) -> int:
        return self.inputs.shape[0]

    def rows(self, fraction: float) -> int:
        """Windows of this shard scored at `fraction` (the first ones, at least one)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        return max(1, math.ceil(fraction * self.n_rows - 1e-9))

    def units(self) -> int:
        return self._units

    def _batches(self, n: int):
        for i in range(0, n, self.batch_size):
            yield slice(i, min(n, i + self.batch_size))

    def _run(self, h, start, end, pattern, buf):
        """model.run_layers with cost accounting (rows x layers) -> (h, index_buffer)."""
        self._units += h.shape[0] * (end - start)
        b, t = h.shape[0], h.shape[1]
        if b not in self._ctx:
            self._ctx[b] = self.model.context(b, t, attn="sparse")
        h, buf, _, _ = self.model.run_layers(h, start, end, ctx=self._ctx[b], pattern=pattern, index_buffer=buf)
        return h, buf

    @torch.no_grad()
    def _full_loss(self, pattern: str, n: int, keep_cache: bool, start: int = 0) -> LossSum:
        """Run `pattern` over the first n rows from layer `start` (cached state below it)."""
        total, tokens = 0.0, 0
        new_h = [[] for _ in range(self.n_layers)]
        new_b = [[] for _ in range(self.n_layers)]
        for rows in self._batches(n):
            if start == 0:
                h, buf = self.model.embed(self.inputs[rows]), None
            else:
                h, buf = self.h_in[start][rows], self.buf_in[start]
                buf = None if buf is None else buf[rows]
            for layer in range(start, self.n_layers):
                if keep_cache:
                    new_h[layer].append(h)
                    new_b[layer].append(buf)
                h, buf = self._run(h, layer, layer + 1, pattern, buf)
            s, c = nll_sum(self.model.head(h), self.targets[rows])
            total, tokens = total + s, tokens + c
        if keep_cache:
            for layer in range(start, self.n_layers):
                self.h_in[layer] = torch.cat(new_h[layer])
                bufs = new_b[layer]
                self.buf_in[layer] = None if bufs[0] is None else torch.cat(bufs)
        return LossSum(total, tokens)

    def reset(self, pattern: str) -> LossSum:
        """Commit `pattern` (filling the prefix cache in prefix mode); return its loss."""
        self.pattern = validate_pattern(pattern, self.n_layers)
        self.stale_from = None
        return self._full_loss(pattern, self.n_rows, keep_cache=self.mode == "prefix")

    def commit(self, layer: int) -> None:
        self.pattern = flip(self.pattern, layer)
        if self.mode == "prefix":
            self.stale_from = layer if self.stale_from is None else min(self.stale_from, layer)

    def _refresh(self) -> None:
        if self.stale_from is not None:
            self._full_loss(self.pattern, self.n_rows, keep_cache=True, start=self.stale_from)
            self.stale_from = None

    @torch.no_grad()
    def evaluate(self, candidates: Sequence[int], fraction: float = 1.0) -> dict[int, LossSum]:
        """Loss of the committed pattern with each candidate layer flipped to S."""
        n = self.rows(fraction)
        if self.mode == "naive":
            return {c: self._full_loss(flip(self.pattern, c), n, keep_cache=False) for c in candidates}
        self._refresh()
        out = {}
        for c in candidates:
            pattern = flip(self.pattern, c)
            total, tokens = 0.0, 0
            for rows in self._batches(n):
                buf = self.buf_in[c]
                h, _ = self._run(self.h_in[c][rows], c, self.n_layers, pattern, None if buf is None else buf[rows])
                s, k = nll_sum(self.model.head(h), self.targets[rows])
                total, tokens = total + s, tokens + k
            out[c] = LossSum(total, tokens)
        return out


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, pattern: str, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token NLL (nats) of every window under `pattern`: windows [R, T + 1] -> [R]."""
    model.eval()
    out = []
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1], pattern=pattern, attn="sparse").logits
        out.append(token_nll(logits, w[:, 1:]).double().mean(dim=1))
    return torch.cat(out)


@torch.no_grad()
def topk_overlap(model, windows: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, int]:
    """Summed |T_i ∩ T_j| / K over query positions t >= K of the all-F model.

    Every layer runs its own indexer (pattern all-F) and T_l [B, T, K] is the buffer it writes.
    Positions t < K are excluded: with at most K candidates their selection is forced.
    Returns (sum matrix [N, N] float64, number of query positions summed).
    """
    model.eval()
    n = len(model.layers)
    pattern = "F" * n
    total, count = torch.zeros(n, n, dtype=torch.float64), 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size, :-1]
        b, t = x.shape
        ctx = model.context(b, t, attn="sparse")
        h, buf, masks = model.embed(x), None, []
        for layer in range(n):
            h, buf, _, _ = model.run_layers(h, layer, layer + 1, ctx=ctx, pattern=pattern, index_buffer=buf)
            k = buf.shape[-1]
            sel = buf[:, k:].long()  # [B, T - K, K]: drop forced positions (HF DSA models give int32)
            m = torch.zeros(b, t - k, t + 1, dtype=torch.bool)
            m.scatter_(-1, torch.where(sel < 0, t, sel), True)  # -1 padding lands in a dummy column
            masks.append(m[..., :t])
        flat = torch.stack(masks).flatten(1, 2).float()  # [N, B*(T-K), T]
        total += torch.einsum("ips,jps->ij", flat, flat).double() / k
        count += b * (t - k)
    return total, count
