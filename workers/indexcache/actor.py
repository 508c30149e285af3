"""Ray calibration actors for the IndexCache search, and the evaluator that drives them.

Each `CalibrationActor` owns the model, one shard of the calibration windows and that
shard's prefix cache. Per greedy step the driver asks every actor for per-candidate
(sum NLL, token count), reduces them in shard order, picks, and broadcasts the commit.
An actor that dies is replaced: the new one gets the same shard, is reset to the committed
pattern (rebuilding its prefix cache) and the lost call is repeated, so the numbers, and
therefore the search, do not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ray
import torch

from tuning.indexcache.losses import LossSum, reduce_shards
from tuning.indexcache.patterns import flip, validate_pattern
from workers.indexcache.evaluate import ShardEvaluator, topk_overlap, window_nll
from workers.runtime.pool import ActorPool


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
        return sum(self.evaluator.model.indexer_calls())

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


class CalibrationPool:
    """A `CandidateEvaluator` over calibration actors, one shard each, on the runtime `ActorPool`."""

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
        shards = split_rows(windows.shape[0], n_workers)
        self._shard_rows = [s.stop - s.start for s in shards]
        model_ref, shard_refs = ray.put(model), [ray.put(windows[s].clone()) for s in shards]
        actor = CalibrationActor.options(num_cpus=num_cpus)
        self.pattern = "F" * self.n_layers
        self._units = 0
        self._pool = ActorPool(
            lambda shard: actor.remote(model_ref, shard_refs[shard], batch_size, mode, threads),
            n_workers,
            on_replace=self._catch_up,
        )

    def _catch_up(self, shard: int, actor) -> None:
        """A replacement is reset to the committed pattern (its prefix cache rebuilt)."""
        _, units = ray.get(actor.reset.remote(self.pattern))
        self._units += units

    @property
    def actors(self) -> list:
        return self._pool.actors

    @property
    def replacements(self) -> int:
        return self._pool.replacements

    def _call_all(self, method: str, *args) -> list:
        return self._pool.each(lambda actor, _: getattr(actor, method).remote(*args))

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
        # A replacement is reset to the new pattern already; committing on it would flip the layer back.
        self._pool.each(lambda actor, _: actor.commit.remote(layer), repeat=False)

    def indexer_calls(self) -> int:
        return sum(self._call_all("indexer_calls"))

    def score_windows(self, windows: torch.Tensor, patterns: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
        """Per-window mean NLL [R] of every pattern, windows spread over the actors."""
        parts = split_rows(windows.shape[0], min(len(self.actors), windows.shape[0]))
        results = self._pool.each(
            lambda actor, i: actor.score_windows.remote(windows[parts[i]].clone(), list(patterns), batch_size),
            len(parts),
        )
        return {p: torch.tensor([v for r in results for v in r[p]], dtype=torch.float64) for p in patterns}

    def overlap(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Mean top-k overlap matrix [N, N] over the windows, spread over the actors."""
        parts = split_rows(windows.shape[0], min(len(self.actors), windows.shape[0]))
        results = self._pool.each(
            lambda actor, i: actor.overlap.remote(windows[parts[i]].clone(), batch_size), len(parts)
        )
        total = sum(r[0] for r in results)
        return total / sum(r[1] for r in results)

    def shutdown(self) -> None:
        self._pool.close()
