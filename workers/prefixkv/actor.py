"""The Ray actor of pipelines.prefixkv: loads the model once, calibrates and evaluates shards.

Actors never touch MLflow: they return plain numbers (lists, dicts) keyed by example index,
and the driver, the only writer, reduces them in index order.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch

from workers.caches.scoring import ScoreConfig
from workers.data.retrieval import RetrievalEvalSet
from workers.prefixkv.calibrate import calibrate_batch
from workers.prefixkv.evaluate import MethodSpec, eval_nll, eval_retrieval
from workers.runtime import faults


def load_model(address: str, device: str = "cpu", dtype: str | None = None):
    """Any model address (workers.model.hf.address) -> HFCausalLM or CalibLM in eval mode."""
    from workers.model.hf.address import load_any

    return load_any(address, device, dtype).eval()


class PrefixKVWorker:
    """Model + the calibration and evaluation calls of the driver (usable without Ray)."""

    def __init__(self, address: str, device: str = "cpu", threads: int = 1, dtype: str | None = None) -> None:
        torch.set_num_threads(threads)
        self.device = device
        self.model = load_model(address, device, dtype)

    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def calibrate(
        self,
        indices: Sequence[int],
        tokens: torch.Tensor,
        scores: Sequence[ScoreConfig],
        n_sink: int,
        ratios: Sequence[float],
        max_steps: int,
    ) -> dict[int, dict]:
        """tokens [B, N] (samples `indices`) -> {index: per-score solutions}."""
        res = calibrate_batch(self.model, tokens.to(self.device), scores, n_sink, ratios, max_steps)
        faults.point("prefixkv.actor_batch")  # the kill tests' actor death: calibrated, result lost
        return dict(zip(indices, res))

    def nll(self, context, continuation, specs: Sequence[MethodSpec], **kw) -> dict[str, list[float]]:
        """context [B, C], continuation [B, M] -> {method key: per-example NLL}."""
        return eval_nll(self.model, context.to(self.device), continuation.to(self.device), specs, **kw)

    def retrieval(self, prompt, value, specs: Sequence[MethodSpec], **kw) -> dict[str, list[int]]:
        """prompt [B, C], value [B, VALUE_LEN] -> {method key: per-example exact match}."""
        data = RetrievalEvalSet(prompt.to(self.device), value.to(self.device), seed=-1, split="heldout")
        return eval_retrieval(self.model, data, specs, **kw)


PrefixKVActor = ray.remote(max_restarts=1, max_task_retries=1)(PrefixKVWorker)
