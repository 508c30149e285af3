"""The MoE balancing experiment: none vs aux loss vs loss-free vs BIP, as a Ray Tune sweep.

Examples (embedded default: local Ray, MLflow in ./mlruns.db, CPU)::

    python -m pipelines.moe_sweep --preset tiny                  # a minute: the test-suite version
    nice -n 10 python -m pipelines.moe_sweep --preset small      # the reported experiment
    python -m pipelines.moe_sweep --preset small --resume <parent_run_id>   # finish a crashed sweep

Every arm x seed is one Tune trial (same initial weights and batches for every arm of a seed).
MLflow: one parent run (the config, per-arm means, a comparison table `comparison.csv` /
`.parquet`, per-trial `trials.csv` and the plot `maxvio_vs_step.png`) and one child run per
trial, written live through Ray Tune's MLflow callback while the trial trains (per-step train
loss, MaxVio per layer, router time; at its end held-out perplexity and global MaxVio under
causal eval routing), named `<arm>-seed<seed>`, the arm and seed as params.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from workers.model.config import ConfigError
from workers.moe.experiment import ARMS, ExperimentConfig
from workers.moe.report import comparison_table, markdown, plot_maxvio, trials_table
from workers.runtime import cli, tracking

ARTIFACTS = tracking.REPO_ROOT / "artifacts"


def tiny() -> ExperimentConfig:
    """Under a minute per trial on one core: the version in the test suite."""
    return ExperimentConfig(
        n_layers=2,
        d_model=32,
        n_heads=2,
        n_experts=8,
        top_k=2,
        expert_hidden=32,
        steps=20,
        batch_size=4,
        seq_len=64,
        eval_windows=16,
        straggler_ep=2,
    )


def small() -> ExperimentConfig:
    """The reported experiment: 4 layers, 16 experts top-2, 200 steps of 8 x 128 bytes."""
    return ExperimentConfig(steps=200)


PRESETS = {"tiny": tiny, "small": small}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.moe_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model + schedule of every arm")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms, from {list(ARMS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (weights and data order)")
    p.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    p.add_argument("--score-fn", choices=["softmax", "sigmoid"], help="override the gate's score function")
    p.add_argument(
        "--gate-skew", type=float, help="plant a router collapsed onto expert 0 at step 0 with this gate weight"
    )
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the pipeline's own)")
    p.add_argument("--run-name", help="MLflow parent run name")
    p.add_argument("--resume", metavar="RUN_ID", help="finish the sweep of this parent MLflow run")
    return p


def parse(args: argparse.Namespace) -> tuple[ExperimentConfig, list[str], list[int]]:
    """Preset + overrides, validated before any work (errors name the bad value)."""
    cfg = PRESETS[args.preset]()
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    if args.score_fn is not None:
        cfg = cfg.replace(score_fn=args.score_fn)
    if args.gate_skew is not None:
        cfg = cfg.replace(gate_skew=args.gate_skew)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ConfigError(f"--arms={args.arms!r}: unknown {bad}; choose from {list(ARMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--seeds={args.seeds!r}: comma-separated integers") from e
    if not seeds:
        raise ConfigError(f"--seeds={args.seeds!r}: at least one seed")
    if args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent={args.max_concurrent}: must be >= 1")
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial={args.cpus_per_trial}: must be > 0")
    return cfg, arms, seeds


def trial_children(client: MlflowClient, parent_id: str, experiment_id: str) -> dict[str, str]:
    """{"arm/seed": child run id} of the parent's finished trial runs (Tune wrote them live)."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)
    return {r.data.tags["trial"]: r.info.run_id for r in runs if r.info.status == "FINISHED" and "trial" in r.data.tags}


def run(
    cfg: ExperimentConfig,
    arms: list[str],
    seeds: list[int],
    *,
    max_concurrent: int = 2,
    cpus_per_trial: float = 1.0,
    experiment: str | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    preset: str = "custom",
) -> dict:
    """Run the sweep and log it; returns {"run_id", "children", "comparison" (DataFrame)}."""
    from workers.moe.sweep import run_sweep
    from workers.runtime.cluster import init_ray

    if resume:
        tracking.check_run(resume)  # without creating an empty store where there is none
        tracking.setup(experiment)
        tracking.mark_failed_if_running(resume)
    params = {
        "preset": preset,
        "arms": ",".join(arms),
        "seeds": ",".join(map(str, seeds)),
        **{f"experiment.{k}": v for k, v in cfg.to_dict().items()},
    }
    with tracking.start_run(
        "moe_sweep", experiment=experiment, run_name=run_name or f"moe-sweep-{preset}", params=params, run_id=resume
    ) as parent:
        pid = parent.info.run_id
        print(f"MLflow parent run {pid} ({tracking.tracking_uri()})", flush=True)
        init_ray()
        live = tracking.trial_runs(
            "moe_sweep",
            name=lambda c: f"{c['arm']}-seed{c['seed']}",
            tags=lambda c: {"trial": f"{c['arm']}/{c['seed']}"},
            params=lambda c: {f"router.{k}": v for k, v in ARMS[c["arm"]].items()},
        )
        trials = run_sweep(
            cfg,
            arms,
            seeds,
            name=f"moe_sweep-{pid}",
            storage=ARTIFACTS / "ray_results",
            max_concurrent=max_concurrent,
            cpus_per_trial=cpus_per_trial,
            resume=resume is not None,
            callbacks=[live],
        )
        client = MlflowClient(tracking.tracking_uri())
        children = trial_children(client, pid, parent.info.experiment_id)
        for rid in children.values():
            client.set_tag(rid, "corpus_sha256", trials[0]["corpus_sha256"])
        mlflow.set_tag("corpus_sha256", trials[0]["corpus_sha256"])
        per_trial = trials_table(trials)
        table = comparison_table(per_trial, arms)
        summary = {
            f"{row.arm}/{col}": float(getattr(row, col))
            for row in table.itertuples()
            for col in table.columns
            if col.endswith("_mean")
        }
        tracking.log_metrics(summary)
        with tempfile.TemporaryDirectory() as d:
            per_trial.to_csv(Path(d) / "trials.csv", index=False)
            table.to_csv(Path(d) / "comparison.csv", index=False)
            table.to_parquet(Path(d) / "comparison.parquet", index=False)
            (Path(d) / "comparison.md").write_text(markdown(table) + "\n")
            plot_maxvio(trials, arms, Path(d) / "maxvio_vs_step.png")
            mlflow.log_artifacts(d)
    print(markdown(table))
    return {"run_id": pid, "children": children, "comparison": table, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, arms, seeds = parse(args)
    run(
        cfg,
        arms,
        seeds,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        experiment=args.experiment,
        run_name=args.run_name,
        resume=args.resume,
        preset=args.preset,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
