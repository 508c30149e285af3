"""Ray calibration actors for the IndexCache search, and the pool that drives them.

Each `CalibrationActor` owns the model, one shard of the calibration windows and that
shard's prefix cache. Per greedy step the driver asks every actor for per-candidate
(sum NLL, token count), reduces them in shard order, picks, and broadcasts the commit.
An actor that dies is replaced: the new one gets the same shard, is reset to the committed
pattern (rebuilding its prefix cache) and the lost call is repeated, so the numbers, and
therefore the search, do not change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import RayActorError

from tuning.indexcache.losses import LossSum, reduce_shards
from tuning.indexcache.patterns import flip, validate_pattern
from workers.indexcache.evaluate import ShardEvaluator, topk_overlap, window_nll

log = logging.getLogger(__name__)
_DEAD = RayActorError  # the actor process is gone (killed, OOM, node lost)


@ray.remote(max_restarts=0)
class CalibrationActor:
    """Model + one calibration shard [R, T + 1] + its prefix cache."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int, mode: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.evaluator = ShardEvaluator(model, windows, batch_size=batch_size, mode=mode)

    def rows(self, fraction: float) -> int:
        return self.evaluator.rows(fraction)

    def reset(self, pattern: str) -> tuple[list, int]:
        before = self.evaluator.units()
        loss = self.evaluator.reset(pattern)
        return loss.to_list(), self.evaluator.units() - before

    def evaluate(self, candidates: list[int], fraction: float) -> tuple[dict[int, list], int]:
        before = self.evaluator.units()
        losses = self.evaluator.evaluate(candidates, fraction)
        return {k: v.to_list() for k, v in losses.items()}, self.evaluator.units() - before

    def commit(self, layer: int) -> str:
        self.evaluator.commit(layer)
        return self.evaluator.pattern

    def indexer_calls(self) -> int:
        return sum(int(layer.attn.indexer_calls) for layer in self.evaluator.model.layers)

    def score_windows(self, windows: torch.Tensor, patterns: list[str], batch_size: int) -> dict[str, list]:
        model = self.evaluator.model
        return {p: window_nll(model, windows, p, batch_size).tolist() for p in patterns}

    def overlap(self, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        return topk_overlap(self.evaluator.model, windows, batch_size)


def split_rows(n: int, parts: int) -> list[slice]:
    """Contiguous, near-equal shards of n rows (the first n % parts get one more)."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} windows into {parts} shards")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        out.append(slice(start, end))
        start = end
    return out


class ActorPool:
    """A `CandidateEvaluator` over calibration actors, one shard each, replacing dead ones."""

    def __init__(
        self,
        model,
        windows: torch.Tensor,
        n_workers: int,
        *,
        batch_size: int = 8,
        mode: str = "prefix",
        num_cpus: float = 1.0,
        threads: int = 1,
    ):
        self.n_layers = len(model.layers)
        self.mode, self.batch_size = mode, batch_size
        self._model_ref = ray.put(model)
        self._shards = [ray.put(windows[s].clone()) for s in split_rows(windows.shape[0], n_workers)]
        self._shard_rows = [s.stop - s.start for s in split_rows(windows.shape[0], n_workers)]
        self._opts = {"num_cpus": num_cpus}
        self._threads = threads
        self.actors = [self._spawn(i) for i in range(n_workers)]
        self.pattern = "F" * self.n_layers
        self.replacements = 0
        self._units = 0

    def _spawn(self, shard: int):
        return CalibrationActor.options(**self._opts).remote(
            self._model_ref, self._shards[shard], self.batch_size, self.mode, self._threads
        )

    def _replace(self, shard: int) -> None:
        """A fresh actor for `shard`, reset to the committed pattern (its cache rebuilt)."""
        log.warning("calibration actor %d died; replacing it and recomputing its shard", shard)
        self.replacements += 1
        self.actors[shard] = self._spawn(shard)
        _, units = ray.get(self.actors[shard].reset.remote(self.pattern))
        self._units += units

    def _call_all(self, method: str, *args) -> list:
        """Call `method` on every actor; a dead actor is replaced and its call repeated."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        out = []
        for shard, ref in enumerate(refs):
            for attempt in range(3):
                try:
                    out.append(ray.get(ref))
                    break
                except _DEAD:
                    if attempt == 2:
                        raise
                    self._replace(shard)
                    ref = getattr(self.actors[shard], method).remote(*args)
        return out

    def total_rows(self) -> int:
        return sum(self._shard_rows)

    def rows(self, fraction: float) -> int:
        return sum(max(1, math.ceil(fraction * r - 1e-9)) for r in self._shard_rows)

    def units(self) -> int:
        return self._units

    def reset(self, pattern: str) -> LossSum:
        self.pattern = validate_pattern(pattern, self.n_layers)
        parts = self._call_all("reset", pattern)
        self._units += sum(u for _, u in parts)
        return reduce_shards([{0: LossSum.from_list(loss)} for loss, _ in parts])[0]

    def evaluate(self, candidates: Sequence[int], fraction: float) -> dict[int, LossSum]:
        parts = self._call_all("evaluate", list(candidates), fraction)
        self._units += sum(u for _, u in parts)
        return reduce_shards([{int(k): LossSum.from_list(v) for k, v in p.items()} for p, _ in parts])

    def commit(self, layer: int) -> None:
        self.pattern = flip(self.pattern, layer)
        # A replacement spawned here is reset to the new pattern already; its commit is
        # then a second flip of the same layer, so commit on replacements is skipped.
        refs = [a.commit.remote(layer) for a in self.actors]
        for shard, ref in enumerate(refs):
            try:
                ray.get(ref)
            except _DEAD:
                self._replace(shard)

    def indexer_calls(self) -> int:
        return sum(self._call_all("indexer_calls"))

    def score_windows(self, windows: torch.Tensor, patterns: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
        """Per-window mean NLL [R] of every pattern, windows spread over the actors."""
        parts = split_rows(windows.shape[0], min(len(self.actors), windows.shape[0]))
        refs = [
            self.actors[i].score_windows.remote(windows[s].clone(), list(patterns), batch_size)
            for i, s in enumerate(parts)
        ]
        results = self._gather(
            refs, lambda i: self.actors[i].score_windows.remote(windows[parts[i]].clone(), list(patterns), batch_size)
        )
        return {p: torch.tensor([v for r in results for v in r[p]], dtype=torch.float64) for p in patterns}

    def overlap(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Mean top-k overlap matrix [N, N] over the windows, spread over the actors."""
        parts = split_rows(windows.shape[0], min(len(self.actors), windows.shape[0]))
        refs = [self.actors[i].overlap.remote(windows[s].clone(), batch_size) for i, s in enumerate(parts)]
        results = self._gather(refs, lambda i: self.actors[i].overlap.remote(windows[parts[i]].clone(), batch_size))
        total = sum(r[0] for r in results)
        return total / sum(r[1] for r in results)

    def _gather(self, refs: list, retry) -> list:
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except _DEAD:
                self._replace(i)
                out.append(ray.get(retry(i)))
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
