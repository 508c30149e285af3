"""KVTuner: per-layer mixed-precision KV cache search on Ray Tune, logged to MLflow.

    python -m pipelines.kvtuner --model runs:/<run_id>/model --budget 4.0 3.25
    python -m pipelines.kvtuner --model hf:/path/to/llama --budget 4.0 --calib-n 16
    python -m pipelines.kvtuner --model smollm2-135m --corpus stdlib --budget 4.0 3.0
    python -m pipelines.kvtuner --model <ckpt dir> --task retrieval --budget 3.0 --clusters 1

Steps (spec/kvtuner.md): 1. sensitivity profile, one layer quantized at a time with each of
the 9 pairs, over profile actors (KL vs full precision and NLL on calibration tokens);
2. per-layer Pareto pruning; 3. k-means clustering of layers (layer 0 alone);
4. NSGA-II over the groups with OptunaSearch on Ray Tune (infeasible maps rejected and
repeated maps served from cache before evaluation); 5. second fidelity (task metric on
validation tokens disjoint from calibration) for the Pareto candidates; 6. one map per
budget, reported with the uniform baselines on held-out tokens (paired, same tokens).
State lives in --work-dir: rerunning the same command resumes the same MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kernels.kv_quant import MODES
from tuning.kvtuner.profile import Profile
from tuning.kvtuner.search import SpaceSpec, run_search
from tuning.kvtuner.space import (
    UNIFORM_BASELINES,
    cluster_layers,
    group_candidates,
    nearest_candidate,
    parse_pair,
    validate_budget,
)
from workers.caches.precision import PREFILL_REGIMES
from workers.kvtuner.actors import TrialDone, run_jobs, run_profile
from workers.kvtuner.report import front_rows, plot_heatmap, plot_pareto, select_for_budget
from workers.model.hf.address import ADDRESS_HELP, DTYPES, check_weights, dtype_name, load_tokenizer, model_shape
from workers.runtime import cli, faults, tracking
from workers.runtime.cluster import init_ray
from workers.runtime.pool import ActorPool
from workers.stats import markdown_table, paired_difference

PIPELINE = "kvtuner"
TASKS = ("text", "retrieval")


HELDOUT_OFFSET = 3  # calibration examples are drawn with seed + 1, validation with seed + 2


def heldout_seed(params: dict) -> int:
    """The held-out examples' seed of a run, from its config or its MLflow params (strings; runs
    logged before --eval-seed have none)."""
    e = params.get("eval_seed")
    return int(params["seed"]) + HELDOUT_OFFSET if e in (None, "None") else int(e)


@dataclass(frozen=True)
class KVTunerConfig:
    model: str
    budget: list[float] = field(default_factory=lambda: [4.0, 3.25])
    task: str = "text"
    mode: str = "kivi"
    group: int = 32
    residual: int = 32
    prefill: str = "full"  # workers.caches.precision.PREFILL_REGIMES
    clusters: int = 4
    num_samples: int = 48
    population: int = 8
    baselines: list[str] = field(default_factory=lambda: list(UNIFORM_BASELINES))
    length: int = 256
    continuation: int = 32
    calib_n: int = 32
    valid_n: int = 64
    report_n: int = 256
    fidelity2: bool = True
    seed: int = 0
    eval_seed: int | None = None  # held-out examples' seed; None: seed + HELDOUT_OFFSET
    corpus: str = "pydoc"
    dtype: str | None = None  # None: fp32 (the search runs on CPU)
    actors: int = 2
    cpus_per_actor: float = 1.0
    work_dir: str | None = None
    run_name: str | None = None

    def __post_init__(self):
        if not self.budget:
            raise ValueError("budget: give at least one average-bits budget")
        object.__setattr__(self, "budget", [validate_budget(b) for b in self.budget])
        object.__setattr__(self, "baselines", [parse_pair(b).name for b in self.baselines])
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prefill not in PREFILL_REGIMES:
            raise ValueError(f"prefill must be one of {PREFILL_REGIMES}, got {self.prefill!r}")
        for name in ("group", "clusters", "num_samples", "calib_n", "valid_n", "report_n", "actors", "length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual!r}")
        if self.population < 2:
            raise ValueError(f"population must be >= 2 (NSGA-II), got {self.population!r}")
        if self.task == "text" and not 0 < self.continuation < self.length:
            raise ValueError(f"continuation must be in (0, length={self.length}), got {self.continuation!r}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        dtype_name(self.dtype)  # a bad name fails here, naming it

    @property
    def heldout_seed(self) -> int:
        return heldout_seed(self.to_params())

    def quant(self) -> dict:
        """Quantizer settings shared by every cache of the run (KVQuantConfig keyword arguments)."""
        return {"mode": self.mode, "group": self.group, "residual": self.residual, "prefill": self.prefill}

    def check_model(self, n_layers: int) -> None:
        if n_layers < 1:
            raise ValueError(f"model {self.model!r} has no layers")

    def name(self) -> str:
        return self.run_name or f"{Path(str(self.model).rstrip('/')).name}-{self.task}-{self.mode}"

    def to_params(self) -> dict:
        return {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(self).items()}


def parse_args(argv=None) -> KVTunerConfig:
    p = argparse.ArgumentParser(prog="python -m pipelines.kvtuner", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=ADDRESS_HELP)
    p.add_argument("--budget", type=float, nargs="+", default=[4.0, 3.25], help="average bits budgets, each in [2, 8]")
    p.add_argument("--task", default="text", help="calibration/report task: text (continuation) or retrieval")
    p.add_argument("--mode", default="kivi", help="quantizer grouping: kivi or per_token")
    p.add_argument("--group", type=int, default=32, help="group size G (KIVI keys: tokens, values: channels)")
    p.add_argument("--residual", type=int, default=32, help="newest tokens kept in full precision (R)")
    p.add_argument(
        "--prefill",
        default="full",
        choices=PREFILL_REGIMES,
        help="full: a forward attends its own keys/values unquantized, stores them quantized (KIVI); "
        "quantized: it attends what is stored (the regime of results before this option)",
    )
    p.add_argument("--clusters", type=int, default=4, help="layer groups besides layer 0 (k = min(this, N-1))")
    p.add_argument("--num-samples", type=int, default=48, help="maps evaluated by the Tune search")
    p.add_argument("--population", type=int, default=8, help="NSGA-II population size")
    p.add_argument("--baselines", nargs="+", default=list(UNIFORM_BASELINES), help="uniform pairs reported")
    p.add_argument("--length", type=int, default=256, help="tokens per example (context + continuation)")
    p.add_argument("--continuation", type=int, default=32, help="scored tokens per text example")
    p.add_argument("--calib-n", type=int, default=32, help="calibration examples (profile + search proxy)")
    p.add_argument("--valid-n", type=int, default=64, help="validation examples for the second fidelity")
    p.add_argument("--report-n", type=int, default=256, help="held-out examples for the report")
    p.add_argument("--fidelity2", action=argparse.BooleanOptionalAction, default=True, help="second fidelity")
    p.add_argument("--seed", type=int, default=0, help="seed of data sampling and NSGA-II")
    p.add_argument(
        "--eval-seed", type=int, default=None, help="held-out examples' seed (default --seed + 3): fixed across seeds"
    )
    p.add_argument("--corpus", default="pydoc", help="corpus source (pydoc, stdlib, .txt, .jsonl, .parquet)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="model dtype (default fp32 on CPU)")
    p.add_argument("--actors", type=int, default=2, help="profile/evaluation actors (and concurrent trials)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor and per Tune trial")
    p.add_argument("--work-dir", default=None, help="resumable state (default artifacts/kvtuner/<run name>)")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    a = p.parse_args(argv)
    return KVTunerConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})


# Settings that only place the work, not what it computes: a resume may change them.
_PLACEMENT = ("actors", "cpus_per_actor", "work_dir", "run_name")


def check_work_dir(cfg: KVTunerConfig, work: Path) -> None:
    """Resume only the same search: a work dir holding another model's or settings' state is refused
    (its profile and trials would silently stand in for this one's)."""
    mine = {k: v for k, v in cfg.to_params().items() if k not in _PLACEMENT}
    stamp = work / "search.json"
    if stamp.is_file():
        theirs = json.loads(stamp.read_text())
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k}={theirs.get(k)!r} there vs {mine.get(k)!r} now" for k in diff)
            raise ValueError(
                f"--work-dir {work} holds the state of a different search ({shown}); use another --work-dir"
            )
    elif (work / "run_id").is_file():
        raise ValueError(
            f"--work-dir {work} holds state from an unknown search (no search.json); use another --work-dir"
        )
    stamp.write_text(json.dumps(mine, indent=1, sort_keys=True))


def main(argv=None) -> dict:

    cfg = parse_args(argv)
    tracking.check_store()  # an unwritable store fails now, not after MLflow's minutes of retries
    n_layers, head_dim, n_kv_heads = model_shape(cfg.model)  # a missing model fails here, before any work
    cfg.check_model(n_layers)
    tokenizer = load_tokenizer(cfg.model)  # one the model cannot use is refused here, before any work
    check_weights(cfg.model)  # else a truncated file fails in every actor, replaced again and again
    import mlflow

    from workers.data.corpus import load_corpus
    from workers.kvtuner.evaluate import build_data

    work = Path(cfg.work_dir or f"artifacts/kvtuner/{cfg.name()}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_work_dir(cfg, work)  # before the data is built: a wrong work dir fails at once
    corpus = load_corpus(cfg.corpus)
    data = lambda split, n, seed, part=(0, 1): build_data(
        cfg.task, corpus, split, n, seed, cfg.length, cfg.continuation, part, tokenizer
    )
    calib, valid = data("calib", cfg.calib_n, cfg.seed + 1, (0, 2)), data("calib", cfg.valid_n, cfg.seed + 2, (1, 2))
    report = data("heldout", cfg.report_n, cfg.heldout_seed)
    run_file = work / "run_id"
    run_id = run_file.read_text().strip() if run_file.is_file() else None
    if run_id:
        tracking.mark_failed_if_running(run_id, f"the run of --work-dir {work}")
    params = {
        **cfg.to_params(),
        **corpus.summary(),
        "n_layers": n_layers,
        "head_dim": head_dim,
        "work_dir": str(work),
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "model_dtype": dtype_name(cfg.dtype),
    }
    tags = {"corpus_sha256": corpus.sha256, "task": cfg.task}
    name = cfg.run_name or tracking.run_label(
        PIPELINE, cfg.model, cfg.task, "b" + ",".join(f"{b:g}" for b in cfg.budget)
    )
    with tracking.start_run(PIPELINE, run_name=name, params=params, tags=tags, run_id=run_id) as run:
        run_file.write_text(run.info.run_id)
        init_ray(log_to_driver=False)  # as before this used init_ray: actor and trial logs stay in Ray's session logs
        out = _run(cfg, work, n_layers, head_dim, n_kv_heads, calib, valid, report)
        for file in sorted(os.listdir(work / "out")):
            mlflow.log_artifact(str(work / "out" / file))
        budgets_dir = work / "out_budgets"
        if budgets_dir.is_dir():
            mlflow.log_artifacts(str(budgets_dir), "budgets")
        from workers.kvtuner.results import shared_metrics

        tracking.log_metrics(shared_metrics(out["metrics"]))  # each budget's own: its child run's
        log_budget_runs(run, name, out)
        out["run_id"] = run.info.run_id
    return out


def log_budget_runs(run, name: str, out: dict) -> None:
    """One child run per budget, the budget and its map as params and the metrics without the
    budget in their names (workers.kvtuner.results.budget_metrics). A resumed run that already has a
    budget's child keeps it."""
    from mlflow.tracking import MlflowClient

    from workers.kvtuner.results import budget_metrics

    client = MlflowClient(tracking.tracking_uri())
    exp, rid = run.info.experiment_id, run.info.run_id
    have = {c.data.params.get("budget") for c in client.search_runs([exp], f"tags.mlflow.parentRunId = '{rid}'")}
    for b, chosen in out["chosen"].items():
        budget = f"{float(b):g}"
        if budget in have:
            continue
        tags = tracking.run_tags(f"{PIPELINE}_budget", **{"mlflow.parentRunId": rid})
        child = client.create_run(exp, run_name=f"{name}-b{budget}", tags=tags).info.run_id
        tracking.log_params({"budget": budget, "map": chosen}, run_id=child)
        tracking.log_metrics(budget_metrics(out["metrics"], float(b)), run_id=child)
        client.set_terminated(child, "FINISHED")


def _run(cfg: KVTunerConfig, work: Path, n_layers, head_dim, n_kv_heads, calib, valid, report) -> dict:
    from ray import tune

    from workers.kvtuner.actors import KVTrial, KVWorker
    from workers.kvtuner.evaluate import batch_windows
    from workers.kvtuner.results import final_report

    quant = cfg.quant()
    out = work / "out"
    out.mkdir(exist_ok=True)
    metrics: dict[str, float] = {}

    datasets = {"calib": calib, "valid": valid, "report": report}
    batch = batch_windows(cfg.length)
    new_pool = lambda: ActorPool.of(
        KVWorker, (cfg.model, datasets, quant, batch, cfg.dtype), cfg.actors, num_cpus=cfg.cpus_per_actor
    )

    # 1. profile and the uniform baselines' calibration proxy (resumable), on one actor pool
    prof_file, base_file = work / "profile.json", work / "baselines_calib.json"
    base_items = [{"op": "proxy", "map": ",".join([parse_pair(b).name] * n_layers)} for b in cfg.baselines]
    if prof_file.is_file() and base_file.is_file():
        profile, base_rows = Profile.load(prof_file), json.loads(base_file.read_text())
    else:
        pool = new_pool()
        try:
            profile = run_profile(pool, n_layers)
            base_rows = run_jobs(pool, base_items)
        finally:
            pool.close()
        for b, r in zip(cfg.baselines, base_rows):
            r.update(name=b, bits=parse_pair(b).bits)
        profile.save(prof_file)
        base_file.write_text(json.dumps(base_rows))
        faults.point("kvtuner.profile_saved")
    kv = profile.keys_vs_values()
    metrics.update({k: float(v) for k, v in kv.items() if isinstance(v, int | float)})
    (out / "profile.json").write_text(json.dumps({**profile.to_dict(), "keys_vs_values": kv}, indent=1))

    # 2-3. prune, cluster
    cands = profile.layer_candidates()
    groups = cluster_layers(profile.damage, cfg.clusters, seed=cfg.seed)
    spec = SpaceSpec(groups, group_candidates(groups, cands), max(cfg.budget))
    clusters = {
        "groups": groups,
        "layer_candidates": [[p.name for p in c] for c in cands],
        "group_candidates": [[p.name for p in c] for c in spec.candidates],
        "space_size": spec.size(),
    }
    (out / "clusters.json").write_text(json.dumps(clusters, indent=1))
    plot_heatmap(profile.damage, str(out / "profile_heatmap.png"), groups)
    metrics.update({"n_groups": float(max(groups) + 1), "space_size": float(spec.size())})

    # 4. NSGA-II search on Ray Tune, seeded with the grouped space's closest maps to each uniform baseline
    seeds = []
    for b in cfg.baselines:
        choice = [nearest_candidate(parse_pair(b), c) for c in spec.candidates]
        if None in choice:
            continue
        seed = spec.config_for(choice)
        if spec.bits(seed) <= spec.budget and seed not in seeds:
            seeds.append(seed)
    trainable = tune.with_parameters(
        KVTrial, model_address=cfg.model, data=calib, quant=quant, spec=spec, batch_size=batch, dtype=cfg.dtype
    )
    rows, stats = run_search(
        trainable,
        spec,
        num_samples=min(cfg.num_samples, spec.size()),
        storage_path=str(work / "tune"),
        name="search",
        seed=cfg.seed,
        population=cfg.population,
        max_concurrent=cfg.actors,
        cpus_per_trial=cfg.cpus_per_actor,
        points=seeds,
        callbacks=[TrialDone("kvtuner.trial_done"), tracking.trial_runs(PIPELINE)],
    )
    metrics.update({f"search_{k}": float(v) for k, v in stats.items()})
    metrics["search_evaluated"] = float(len(rows))

    front = front_rows(rows)

    # 5. second fidelity on validation tokens, Pareto candidates only; then the held-out report
    pool = new_pool()
    try:
        if cfg.fidelity2 and front:
            fid = run_jobs(pool, [{"op": "task", "map": r["map"], "data": "valid"} for r in front])
            for r, f in zip(front, fid):
                r["fidelity2"], r["fidelity2_se"], r["_f2_per"] = f["value"], f["se"], f["per_example"]
        chosen = _choose(cfg, rows, front)
        calib_kl = {parse_pair(r["name"]).name: r["damage"] for r in base_rows}
        rep = final_report(cfg, chosen, calib_kl, n_layers, head_dim, n_kv_heads, pool, report, work)
    finally:
        pool.close()
    cols = ["map", "bits", "damage", "nll", "exact"] + (["fidelity2", "fidelity2_se"] if cfg.fidelity2 else [])
    (out / "pareto.md").write_text(markdown_table(front, cols))
    front_out = [{k: v for k, v in r.items() if not k.startswith("_")} for r in front]
    (out / "search_rows.json").write_text(json.dumps({"rows": rows, "front": front_out, "baselines": base_rows}))
    plot_pareto(rows, base_rows, str(out / "pareto.png"), f"KVTuner {cfg.task}: {cfg.name()}")

    metrics.update(rep["metrics"])
    return {"metrics": metrics, "chosen": {str(b): r["map"] for b, r in chosen.items()}, "report": rep}


def _choose(cfg: KVTunerConfig, rows: list[dict], front: list[dict]) -> dict:
    """One map per budget.

    Without a second fidelity: least calibration KL within the budget. With it: the Pareto
    candidates within the budget that are not worse than the best one on the validation metric
    by more than one paired standard error, and among those the least calibration KL (so noise
    in a small validation set cannot trade bits away; a real validation loss still vetoes a map).
    """
    chosen = {}
    sign = 1.0 if cfg.task == "retrieval" else -1.0  # exact match up, NLL down
    for b in cfg.budget:
        fit = [r for r in (front if cfg.fidelity2 and front else rows) if r["bits"] <= b + 1e-9]
        if not fit:
            raise RuntimeError(f"no evaluated map fits budget {b}; raise --num-samples")
        if cfg.fidelity2 and front:
            best = max(fit, key=lambda r: sign * r["fidelity2"])
            ok = []
            for r in fit:
                d, se = paired_difference(r["_f2_per"], best["_f2_per"]) if r is not best else (0.0, 0.0)
                if sign * d >= -(se if se == se else 0.0):
                    ok.append(r)
            fit = ok
        chosen[b] = select_for_budget(fit, b, "damage")
    return chosen


if __name__ == "__main__":
    res = cli.run(main, sys.argv[1:])
    print(json.dumps({"run_id": res["run_id"], "chosen": res["chosen"]}, indent=1))
