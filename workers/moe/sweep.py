"""Ray Tune glue of the balancing experiment: one trial = one (arm, seed), trials in parallel.

Trials only compute and report numbers: every step's loss, MaxVio (mean and per layer), router
time and straggler ratio as it happens, then the summary (held-out perplexity, MaxVio
statistics) and the whole per-step series. The driver is the one MLflow writer: the callbacks
it passes (tracking.trial_runs) write each trial's reports live as its child run. The Tune
experiment lives under a directory named after the parent MLflow run, so an interrupted sweep is
restored with its finished trials kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.moe.experiment import ExperimentConfig, train_arm


def trainable(config: dict) -> None:
    """Tune function trainable: config = {"arm", "seed", "experiment": ExperimentConfig dict}."""
    from ray import tune

    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = ExperimentConfig(**config["experiment"])

    def progress(step: int, row: dict) -> None:
        # Per-expert loads stay out of the live report (96 charts for 4 layers x 16 experts in the
        # MLflow UI); they are in the final series and the sweep's plot.
        tune.report({"step": step, **{k: v for k, v in row.items() if not k.startswith("load_layer")}})

    out = train_arm(cfg, config["arm"], int(config["seed"]), on_step=progress)
    tune.report(
        {
            "step": cfg.steps,
            **out["summary"],
            "series": out["series"],
            "corpus_sha256": out["corpus_sha256"],
        }
    )


def run_sweep(
    cfg: ExperimentConfig,
    arms: list[str],
    seeds: list[int],
    *,
    name: str,
    storage: Path,
    max_concurrent: int,
    cpus_per_trial: float = 1.0,
    resume: bool = False,
    callbacks: list | None = None,
) -> list[dict]:
    """Run (or restore and finish) the grid arms x seeds; returns one dict per finished trial:
    {"arm", "seed", "summary", "series", "corpus_sha256"}. Raises if any trial errored.
    `callbacks`: Tune callbacks (the driver's MLflow writer), also on a restore."""
    from ray import tune

    resources = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    path = storage / name
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=resources, resume_errored=True)
    else:
        tuner = tune.Tuner(
            resources,
            param_space={
                "arm": tune.grid_search(arms),
                "seed": tune.grid_search(seeds),
                "experiment": cfg.to_dict(),
                "threads": max(1, int(cpus_per_trial)),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=callbacks),
        )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(grid)} trials failed; first error: {errors[0]}")
    out = []
    for r in grid:
        m = dict(r.metrics)
        series = m.pop("series")
        summary = {k: float(v) for k, v in m.items() if k in _SUMMARY_KEYS}
        out.append(
            {
                "arm": r.config["arm"],
                "seed": int(r.config["seed"]),
                "summary": summary,
                "series": series,
                "corpus_sha256": m.get("corpus_sha256", ""),
            }
        )
    return sorted(out, key=lambda t: (arms.index(t["arm"]), t["seed"]))


_SUMMARY_KEYS = {
    "avg_maxvio",
    "sup_maxvio",
    "maxvio_step1",
    "maxvio_1_20",
    "maxvio_last20",
    "heldout_nll",
    "heldout_nll_se",
    "heldout_ppl",
    "heldout_bpb",
    "heldout_global_maxvio",
    "heldout_global_maxvio_sup",
    "final_train_loss",
    "tokens_per_s",
    "router_ms_per_step",
    "straggler_ratio",
}
