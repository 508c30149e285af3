"""What runs inside Ray workers for the KVTuner search: profile actors and the Tune trainable.

Both load the model once (`load_any`: `runs:/...`, a checkpoint directory, or `hf:<dir>`),
compute the full-precision reference log-probabilities once, and then evaluate many
precision settings on the same tokens. They return numbers; the driver writes MLflow.
"""

from __future__ import annotations

import torch
from ray import tune

from tuning.kvtuner_search import SpaceSpec
from tuning.kvtuner_space import PAIRS, parse_pair
from workers.hf_adapter import load_any
from workers.kvcache.config import KVQuantConfig
from workers.kvcache.evaluate import EvalData, cache_factory, logprobs, proxy_metrics, summary, task_metric


class _Evaluator:
    """Model + calibration data + reference log-probs, loaded once per worker."""

    def __init__(self, model_address: str, data: EvalData, quant: dict, batch_size: int = 32):
        torch.manual_seed(0)
        self.model = load_any(model_address)
        self.n_layers = self.model.cfg.n_layers
        self.data, self.quant, self.batch_size = data, dict(quant), batch_size
        self.ref = logprobs(self.model, data, cache_factory(None, self.n_layers), batch_size)

    def config(self, layers) -> KVQuantConfig:
        return KVQuantConfig(tuple(layers), **self.quant)

    def evaluate(self, layers, only_layer: int | None = None) -> dict:
        cfg = self.config(layers)
        lp = logprobs(self.model, self.data, cache_factory(cfg, self.n_layers, "fake", only_layer), self.batch_size)
        return proxy_metrics(self.ref, lp, self.data)


class ProfileWorker:
    """Ray actor: `run(jobs)` with jobs [(layer, 'K8V4'), ...] -> one metrics dict per job.

    A job quantizes that layer only (all others full precision) with the given pair; one
    prefill + one continuation pass per calibration batch.
    """

    def __init__(self, model_address: str, data: EvalData, quant: dict, batch_size: int = 32):
        self.ev = _Evaluator(model_address, data, quant, batch_size)

    def n_layers(self) -> int:
        return self.ev.n_layers

    def run(self, jobs: list[tuple[int, str]]) -> list[dict]:
        out = []
        for layer, pair in jobs:
            p = parse_pair(pair)
            m = self.ev.evaluate([p] * self.ev.n_layers, only_layer=layer)
            out.append({"layer": layer, "pair": p.name, "damage": m["damage"], "nll": m["nll"], "exact": m["exact"]})
        return out


class MapWorker:
    """Ray actor: `run(items)` with items [(name, "K8V4,KV4,..." or None for full precision), ...].

    With `task=False`: proxy metrics (KL, NLL vs full precision) on the data; with `task=True`:
    the task metric (continuation NLL or exact match) with per-example values.
    """

    def __init__(self, model_address: str, data: EvalData, quant: dict, task: bool = True, batch_size: int = 32):
        self.task = task
        if task:
            torch.manual_seed(0)
            self.model = load_any(model_address)
            self.n_layers, self.data, self.quant = self.model.cfg.n_layers, data, dict(quant)
            self.batch_size = batch_size
        else:
            self.ev = _Evaluator(model_address, data, quant, batch_size)

    def run(self, items: list[tuple[str, str | None]]) -> list[dict]:
        out = []
        for name, layers in items:
            if not self.task:
                m = self.ev.evaluate(layers.split(","))
                out.append({"name": name, "damage": m["damage"], "nll": m["nll"], "exact": m["exact"]})
                continue
            cfg = None if layers is None else KVQuantConfig(tuple(layers.split(",")), **self.quant)
            r = task_metric(self.model, self.data, cfg, self.n_layers, self.batch_size)
            out.append({"name": name, **summary(r), "per_example": [float(x) for x in r.per_example]})
        return out


def profile_jobs(n_layers: int) -> list[tuple[int, str]]:
    return [(layer, p.name) for layer in range(n_layers) for p in PAIRS]


class KVTrial(tune.Trainable):
    """Tune trainable: one step evaluates one grouped precision map on the calibration tokens.

    `setup` loads the model once; `reset_config` lets Tune reuse the actor (reuse_actors=True)
    for the next map without reloading.
    """

    def setup(self, config, model_address=None, data=None, quant=None, spec: SpaceSpec | None = None, batch_size=32):
        self.spec = spec
        self.ev = _Evaluator(model_address, data, quant, batch_size)

    def reset_config(self, new_config) -> bool:
        self.config = new_config
        return True

    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        # A trial is one evaluation: nothing to resume inside it (the searcher holds the state).
        return {}

    def load_checkpoint(self, checkpoint) -> None:
        return None

    def step(self) -> dict:
        layers = self.spec.layer_map(self.config)
        m = self.ev.evaluate(layers)
        return {
            "damage": m["damage"],
            "nll": m["nll"],
            "exact": m["exact"],
            "bits": self.spec.bits(self.config),
            "map": ",".join(p.name for p in layers),
            "done": True,
        }
