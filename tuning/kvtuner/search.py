"""Multi-objective KVTuner search over layer groups on Ray Tune (OptunaSearch, NSGA-II).

Shape legend: G layer groups, N layers.

Each group picks one of its Pareto-pruned pairs, so the space is prod_g |candidates_g|.
The search minimises [damage proxy, equivalent bits] (NSGA-II with a constraint bits <= budget):

1. `GuardedSearcher` wraps `OptunaSearch`. Before a suggestion becomes a Tune trial it is
   checked: a map over the budget is told back to Optuna at once (constraint violated, no
   evaluation), and a map seen before is told back with its cached result. Only new feasible
   maps reach a trial, so `num_samples` counts real evaluations.
2. Trials run a `tune.Trainable` given by the caller (it loads the model once in `setup` and
   `reuse_actors=True` keeps it loaded across trials), which reports `damage`, `nll`, `bits`.
3. The Tuner writes its experiment under `storage_path/name`; a crashed search resumes with
   `Tuner.restore` (the searcher's state, cache included, is saved with it).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

from ray.tune.search import Searcher

from tuning.kvtuner.space import Pair, equivalent_bits, expand, parse_pair

METRICS = ["damage", "bits"]
MODES = ["min", "min"]
INFEASIBLE_DAMAGE = 1e6
TRIAL_RETRIES = 2  # Tune reruns a trial whose actor died this many times before it counts as errored


def group_key(g: int) -> str:
    return f"g{g:02d}"


@dataclass
class SpaceSpec:
    """The grouped search space: groups [N] (group id per layer) and candidates per group."""

    groups: list[int]
    candidates: list[list[Pair]]
    budget: float
    _params: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        if max(self.groups) + 1 != len(self.candidates):
            raise ValueError(f"{len(self.candidates)} candidate lists for {max(self.groups) + 1} groups")
        for g, c in enumerate(self.candidates):
            if not c:
                raise ValueError(f"group {g} has no candidate pairs")
        self._params = [group_key(g) for g in range(len(self.candidates))]

    def layer_map(self, config: dict) -> list[Pair]:
        """Tune/Optuna config {g00: 'K8V4', ...} -> per-layer map [N]."""
        return expand(self.groups, [parse_pair(config[p]) for p in self._params])

    def bits(self, config: dict) -> float:
        return equivalent_bits(self.layer_map(config))

    def key(self, config: dict) -> tuple[str, ...]:
        return tuple(str(config[p]) for p in self._params)

    def optuna_space(self) -> dict:
        from optuna.distributions import CategoricalDistribution

        return {p: CategoricalDistribution([c.name for c in cands]) for p, cands in zip(self._params, self.candidates)}

    def config_for(self, choice: Sequence[Pair]) -> dict:
        return {p: c.name for p, c in zip(self._params, choice)}

    def size(self) -> int:
        n = 1
        for c in self.candidates:
            n *= len(c)
        return n


def make_optuna_search(spec: SpaceSpec, seed: int, population: int, points: list[dict]):
    """OptunaSearch with an NSGA-II sampler; the budget constraint is set on each trial when it is told.

    (Constraint-aware NSGA-II ranks every feasible map above every infeasible one.)
    """
    from optuna.samplers import NSGAIISampler
    from ray.tune.search.optuna import OptunaSearch

    sampler = NSGAIISampler(population_size=population, seed=seed)
    return OptunaSearch(
        space=spec.optuna_space(),
        metric=list(METRICS),
        mode=list(MODES),
        sampler=sampler,
        points_to_evaluate=points or None,
    )


class GuardedSearcher(Searcher):
    """Rejects infeasible maps and serves repeated maps from a cache before any trial starts.

    `stats` counts `rejected_infeasible` and `cache_hits`; `results` maps a config key to the
    metrics of its one evaluation.
    """

    def __init__(self, inner, spec: SpaceSpec, max_resample: int = 100):
        super().__init__(metric=list(METRICS), mode=list(MODES))
        self.inner = inner
        self.spec = spec
        self.max_resample = max_resample
        self.results: dict[tuple[str, ...], dict] = {}
        self.pending: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.in_flight: set[tuple[str, ...]] = set()
        self.stats = {"rejected_infeasible": 0, "cache_hits": 0}
        self._n = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def _tell(self, inner_id: str, bits: float, result: dict | None, error: bool = False) -> None:
        # OptunaSearch keeps its Optuna trials by id; the constraint must be set before `tell`.
        trial = getattr(self.inner, "_ot_trials", {}).get(inner_id)
        if trial is not None:
            trial.set_constraint("bits_over_budget", bits - self.spec.budget)
        self.inner.on_trial_complete(inner_id, result, error=error)

    def suggest(self, trial_id: str):
        for _ in range(self.max_resample):
            self._n += 1
            inner_id = f"{trial_id}_{self._n}"
            config = self.inner.suggest(inner_id)
            if config in (None, Searcher.FINISHED):
                return config
            key = self.spec.key(config)
            bits = self.spec.bits(config)
            if bits > self.spec.budget + 1e-9:
                self.stats["rejected_infeasible"] += 1
                self._tell(inner_id, bits, {"damage": INFEASIBLE_DAMAGE, "bits": bits})
                continue
            if key in self.results:
                self.stats["cache_hits"] += 1
                self._tell(inner_id, bits, self.results[key])
                continue
            if key in self.in_flight:
                self.stats["cache_hits"] += 1
                self._tell(inner_id, bits, None)
                continue
            self.pending[trial_id] = (inner_id, key)
            self.in_flight.add(key)
            return dict(config)
        # Every recent suggestion was infeasible or already known: the space is exhausted.
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id not in self.pending:
            return
        inner_id, key = self.pending.pop(trial_id)
        self.in_flight.discard(key)
        bits = self.spec.bits(dict(zip(self.spec._params, key)))
        if result and not error:
            metrics = {m: float(result[m]) for m in METRICS}
            self.results[key] = metrics
            self._tell(inner_id, bits, metrics)
        else:
            self._tell(inner_id, bits, None, error=True)

    def save(self, checkpoint_path: str):
        state = {k: v for k, v in self.__dict__.items() if k != "inner"}
        state["inner_state"] = copy.copy(self.inner.__dict__)
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.inner.__dict__.update(state.pop("inner_state"))
        # Trials that were running when the search stopped are evaluated again.
        state["pending"], state["in_flight"] = {}, set()
        self.__dict__.update(state)


def run_search(
    trainable,
    spec: SpaceSpec,
    *,
    num_samples: int,
    storage_path: str,
    name: str,
    seed: int = 0,
    population: int = 8,
    max_concurrent: int = 2,
    cpus_per_trial: float = 1.0,
    points: list[dict] | None = None,
    resume: bool = True,
    callbacks: list | None = None,
) -> tuple[list[dict], dict]:
    """Run (or resume) the Tune search; returns (one row per evaluated map, searcher stats).

    `trainable` is a `tune.Trainable` class already bound with `tune.with_parameters`; `callbacks` are
    Tune callbacks (saved with the experiment, so a restored search keeps them). Each row:
    {"key": group choices, "damage", "nll", "exact", "bits", "map"}.
    """
    import os

    from ray import tune

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    path = os.path.join(storage_path, name)
    searcher = GuardedSearcher(make_optuna_search(spec, seed, population, points or []), spec)
    resources = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=resources, resume_errored=True)
    else:
        tuner = tune.Tuner(
            resources,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent,
                reuse_actors=True,
            ),
            # A trial whose actor died is run again (same config): a lost evaluation would change the front.
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                verbose=0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
            ),
        )
    grid = tuner.fit()
    rows, seen = [], set()
    for r in grid:
        m = r.metrics or {}
        if "damage" not in m or r.error:
            continue
        key = spec.key(r.config)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"key": list(key), **{k: m[k] for k in ("damage", "nll", "exact", "bits", "map")}})
    return rows, dict(searcher.stats)
