"""Evaluate compression methods on the same tokens: continuation NLL and retrieval exact match.

Shape legend: N examples, C context length, M continuation length.

Every method runs on the same examples in the same order, so the driver can form paired
differences (PrefixKV minus uniform, per example) and their standard errors. Each batch is
prefilled once at full precision and every method's cache is replayed from that prefill
(``workers.eval.prefill_scored``): the same caches as a prefill per method, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuning.prefixkv.plan import SCHEDULES
from workers.caches import scorers
from workers.caches.scoring import ScoreConfig
from workers.data.retrieval import RetrievalEvalSet
from workers.eval import continuation_logits, exact_match, prefill_scored, token_nll
from workers.prefixkv.methods import Method, method_label


@dataclass(frozen=True)
class MethodSpec:
    """A method at one ratio; `score` is the token score of a budget schedule (prefixkv / uniform / pyramid)."""

    name: str
    ratio: float
    score: str = "sum"

    @property
    def key(self) -> str:
        return f"{method_label(self.name, self.score)}@{self.ratio:g}"


def method_grid(ratios: Sequence[float], scores: Sequence[str]) -> list[MethodSpec]:
    """full once; per ratio: every budget schedule with each score, then every position scorer (recency, random)."""
    specs = [MethodSpec("full", 1.0)]
    for r in ratios:
        for s in scores:
            specs += [MethodSpec(n, r, s) for n in SCHEDULES]
        specs += [MethodSpec(n, r) for n in scorers.names(attention=False)]
    return specs


def build_method(
    spec: MethodSpec, n_layers: int, n_sink: int, window: int, calibrated: dict | None, seed=0, pool: int = 1
):
    """calibrated: {score mode: {ratio: [L] fractions}} (needed by "prefixkv" only)."""
    score = ScoreConfig(spec.score, window=window, seed=seed, pool=pool)  # pool only touches attention scores
    cal = (calibrated or {}).get(spec.score) if spec.name == "prefixkv" else None
    return Method(spec.name, spec.ratio, n_layers, score, n_sink, cal)


def _shared(model, x: torch.Tensor, y: torch.Tensor, methods: dict, batch_size: int, metric) -> dict[str, list]:
    """Per batch one full-precision prefill (scored by every method's token score), then every
    method's cache replayed from it: metric(logits [B, M, V], y [B, M]) -> per-example values."""
    out: dict[str, list] = {key: [] for key in methods}
    for i in range(0, x.shape[0], batch_size):
        c, t = x[i : i + batch_size], y[i : i + batch_size]
        pre = prefill_scored(model, c, [m.score for m in methods.values()])
        for key, m in methods.items():
            out[key].extend(metric(continuation_logits(model, c, t, prefilled=pre, **m.forward_kwargs()), t))
    return out


def _methods(specs, n_layers, n_sink, window, calibrated, pool) -> dict:
    return {spec.key: build_method(spec, n_layers, n_sink, window, calibrated, pool=pool) for spec in specs}


def eval_nll(
    model,
    context: torch.Tensor,
    continuation: torch.Tensor,
    specs: Sequence[MethodSpec],
    *,
    n_sink: int,
    window: int,
    calibrated: dict | None,
    batch_size: int = 8,
    pool: int = 1,
) -> dict[str, list[float]]:
    """context [N, C], continuation [N, M] -> {spec key: per-example mean NLL (nats)}."""
    methods = _methods(specs, model.cfg.n_layers, n_sink, window, calibrated, pool)
    nll = lambda logits, y: token_nll(logits, y).mean(1).tolist()
    return _shared(model, context, continuation, methods, batch_size, nll)


def eval_retrieval(
    model,
    data: RetrievalEvalSet,
    specs: Sequence[MethodSpec],
    *,
    n_sink: int,
    window: int,
    calibrated: dict | None,
    batch_size: int = 16,
    pool: int = 1,
) -> dict[str, list[int]]:
    """{spec key: per-example exact match (0/1)} on the retrieval task."""
    methods = _methods(specs, model.cfg.n_layers, n_sink, window, calibrated, pool)
    return _shared(model, data.prompt, data.value, methods, batch_size, exact_match)
