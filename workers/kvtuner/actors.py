"""What runs inside Ray workers for the KVTuner search: the evaluation actor and the Tune trainable.

Both load the model once (`load_any`: `runs:/...`, a checkpoint directory, or `hf:<dir>`),
compute full-precision reference log-probabilities once per data set, and then evaluate many
precision settings on the same tokens. They return numbers; the driver writes MLflow.
"""

from __future__ import annotations

import torch
from ray import tune

from tuning.kvtuner.profile import Profile, assemble
from tuning.kvtuner.search import SpaceSpec
from tuning.kvtuner.space import PAIRS, parse_pair
from workers.caches.precision import KVQuantConfig
from workers.kvtuner.evaluate import (
    EvalData,
    cache_factory,
    logprobs,
    prefills,
    proxy_metrics,
    summary,
    task_metric,
)
from workers.model.hf.address import load_any
from workers.runtime import faults
from workers.runtime.pool import ActorPool


class KVWorker:
    """Ray actor holding the model and named data sets; `run(job)` evaluates one job.

    Jobs (dicts):
    - {"op": "probe", "layer": l, "pair": "K8V4", "data": "calib"}: only layer l quantized
      (the sensitivity profile; one prefill + one continuation pass per batch);
    - {"op": "proxy", "map": "K8V4,KV4,...", "data": "calib"}: KL / NLL vs full precision;
    - {"op": "task", "map": "..." or None, "data": "report"}: the task metric (continuation
      NLL or exact match) with per-example values; map None = full precision.
    """

    def __init__(
        self,
        model_address: str,
        datasets: dict[str, EvalData],
        quant: dict,
        batch_size: int = 32,
        dtype: str | None = None,
    ):
        torch.manual_seed(0)
        self.model = load_any(model_address, dtype=dtype)
        self.n_layers = self.model.cfg.n_layers
        self.datasets, self.quant, self.batch_size = datasets, dict(quant), batch_size
        self._ref: dict[str, torch.Tensor] = {}
        self._prefills: dict[str, list] = {}

    def ref(self, name: str) -> torch.Tensor:
        if name not in self._ref:
            make = cache_factory(None, self.n_layers)
            self._ref[name] = logprobs(self.model, self.datasets[name], make, self.batch_size, self.prefilled(name))
        return self._ref[name]

    def prefilled(self, name: str) -> list | None:
        """The data set's full-precision prefill, shared by every map when the prompt attends to itself at
        full precision (prefill="full"); None in the "quantized" regime, where each map prefills anew."""
        if self.quant.get("prefill", "full") != "full":
            return None
        if name not in self._prefills:
            self._prefills[name] = prefills(self.model, self.datasets[name], self.batch_size)
        return self._prefills[name]

    def config(self, layers) -> KVQuantConfig:
        return KVQuantConfig(tuple(layers), **self.quant)

    def proxy(self, layers, data: str, only_layer: int | None = None) -> dict:
        d = self.datasets[data]
        make = cache_factory(self.config(layers), self.n_layers, "fake", only_layer)
        lp = logprobs(self.model, d, make, self.batch_size, self.prefilled(data))
        return proxy_metrics(self.ref(data), lp, d)

    def run(self, job: dict) -> dict:
        out = self._run(job)
        faults.point("kvtuner.actor_job")  # the kill tests' actor death: the job done, its result lost
        return out

    def _run(self, job: dict) -> dict:
        op, data = job["op"], job.get("data", "calib")
        if op == "probe":
            p = parse_pair(job["pair"])
            m = self.proxy([p] * self.n_layers, data, only_layer=job["layer"])
            return {"layer": job["layer"], "pair": p.name, **{k: m[k] for k in ("damage", "nll", "exact")}}
        if op == "proxy":
            m = self.proxy(job["map"].split(","), data)
            return {"map": job["map"], **{k: m[k] for k in ("damage", "nll", "exact")}}
        if op == "task":
            cfg = None if job["map"] is None else self.config(job["map"].split(","))
            r = task_metric(self.model, self.datasets[data], cfg, self.n_layers, self.batch_size, self.prefilled(data))
            return {"map": job["map"], **summary(r), "per_example": [float(x) for x in r.per_example]}
        raise ValueError(f"unknown KVWorker op {op!r}")


def run_jobs(pool: ActorPool, jobs: list[dict]) -> list[dict]:
    """`KVWorker.run` of every job on the pool's actors, in job order."""
    return list(pool.map(lambda actor, job: actor.run.remote(job), jobs))


def profile_jobs(n_layers: int, data: str = "calib") -> list[dict]:
    return [{"op": "probe", "layer": layer, "pair": p.name, "data": data} for layer in range(n_layers) for p in PAIRS]


class TrialDone(tune.Callback):
    """Hits fault point `name` (workers.runtime.faults) after every completed trial, in the driver."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        faults.point(self.name)


class KVTrial(tune.Trainable):
    """Tune trainable: one step evaluates one grouped precision map on the calibration tokens.

    `setup` loads the model once; `reset_config` lets Tune reuse the actor (reuse_actors=True)
    for the next map without reloading.
    """

    def setup(
        self,
        config,
        model_address=None,
        data=None,
        quant=None,
        spec: SpaceSpec | None = None,
        batch_size=32,
        dtype=None,
    ):
        self.spec = spec
        self.worker = KVWorker(model_address, {"calib": data}, quant, batch_size, dtype)

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
        m = self.worker.proxy(layers, "calib")
        faults.point("kvtuner.trial_step")  # the kill tests' trial death: evaluated, not yet reported
        return {
            "damage": m["damage"],
            "nll": m["nll"],
            "exact": m["exact"],
            "bits": self.spec.bits(self.config),
            "map": ",".join(p.name for p in layers),
            "done": True,
        }


def run_profile(pool: ActorPool, n_layers: int) -> Profile:
    """The N * 9 single-layer probes on the pool's calibration data -> Profile."""
    return assemble(run_jobs(pool, profile_jobs(n_layers)), n_layers)
