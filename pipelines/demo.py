"""The end-to-end demo: every method on a real model where a real model is the test, in at most 15 minutes.

    python -m pipelines.demo                    # the full chain (at most 15 minutes on 2 cores)
    python -m pipelines.demo --preset smoke     # the same chain at toy scale (at most 3 minutes)
    python -m pipelines.demo --verbose          # every pipeline's own output on the console too
    python -m pipelines.demo --resume <run id>  # finish a demo that was killed or failed

Stages, each a real pipeline whose MLflow run is a child of one `demo` parent run:
1. train the DSA-MoE model with BIP balancing, expert parallel over 2 Ray Train workers (reused
   when a model of the same config was trained before, in any experiment);
2. IndexCache greedy layer selection on it;
3. KVTuner precision search on SmolLM2-135M (long-context continuation NLL);
4. PrefixKV budgets on SmolLM2-135M (the same task);
5. both calibrated caches on natural-language retrieval with SmolLM2-135M;
6. SmolLM2-135M served on Ray Serve with the calibrated caches beside a full-cache deployment,
   asked the same chat questions through the `openai` client.
`--resume` continues the same parent run: stages that finished are reused (their runs stay the
table's), a killed training run resumes from its last checkpoint, KVTuner and the retrieval
benchmark continue from their work dirs, the others run again. The console shows one line per stage and the verdict table; everything else (Ray's, MLflow's and
the pipelines' own output) goes to the log file named at the start. Verdicts are demo-scale:
docs/ holds the full-scale results.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import train_moe
from pipelines.demo_console import Console
from workers.runtime import cli, tracking
from workers.training.config import TrainConfig, demo, tiny

EXPERIMENT = "demo"
REAL_MODEL = "smollm2-135m"
STAGES = ("train_moe", "indexcache", "kvtuner", "prefixkv", "retrieval", "serve")
STAGE_OF = {"kv_retrieval": "retrieval"}  # a stage's pipeline tag, where it differs from the stage


def _args(text: str) -> list[str]:
    return text.split()


@dataclass(frozen=True)
class DemoPreset:
    """Each stage's command-line arguments and its time budget (seconds, 2 cores)."""

    name: str
    moe: TrainConfig
    indexcache: list[str]
    kvtuner: list[str]
    kv_budget: float  # the KVTuner budget the search runs at and the calibrated replica serves
    prefixkv: list[str]
    keep_ratio: float  # the PrefixKV keep ratio evaluated (the claim's ratio)
    retrieval: list[str]
    budgets_s: dict[str, int] = field(default_factory=dict)
    retention: float = 0.25  # the IndexCache retention the table reports
    # The keep ratio the calibrated replica serves. 0.5, not the claim's 0.2: at 0.2 (with the
    # 3.25-bit map) the first full run's calibrated answers degenerated into repeated quotes.
    serve_keep_ratio: float = 0.5

    def __post_init__(self):
        if set(self.budgets_s) != set(STAGES):
            raise ValueError(f"preset {self.name}: budgets_s must name exactly the stages {STAGES}")


def full() -> DemoPreset:
    return DemoPreset(
        name="full",
        moe=demo().replace(num_workers=2, ep_size=2, cpus_per_worker=1.0),
        indexcache=_args(
            "--retention 0.5 0.25 0.125 --workers 2 --worker-cpus 0.9 --calib-windows 16 --heldout-windows 64 "
            "--no-overlap"
        ),
        kvtuner=_args(
            "--corpus stdlib --task text --length 544 --continuation 32 --calib-n 4 --valid-n 8 --report-n 24 "
            "--num-samples 8 --population 4 --clusters 4 --baselines KV4 K4V2 K2V4 KV2 --actors 1 --cpus-per-actor 2"
        ),
        kv_budget=3.25,
        prefixkv=_args(
            "--corpus stdlib --data text --samples 4 --workers 1 --cpus-per-worker 2 --context 512 --continuation 32 "
            "--scores window --eval-samples 24 --batch-size 4"
        ),
        keep_ratio=0.2,
        retrieval=_args("--records 2 4 --lengths 256 --calib-n 16 --n 64 --external-n 0 --threads 2"),
        budgets_s={"train_moe": 300, "indexcache": 60, "kvtuner": 200, "prefixkv": 120, "retrieval": 100, "serve": 60},
    )


def smoke() -> DemoPreset:
    small = tiny().replace(steps=30, eval_windows=16)
    return DemoPreset(
        name="smoke",
        moe=small.replace(num_workers=2, ep_size=2, cpus_per_worker=0.5),
        indexcache=_args(
            "--retention 0.5 --workers 1 --worker-cpus 0.5 --calib-windows 4 --heldout-windows 8 --no-overlap"
        ),
        kvtuner=_args(
            "--corpus stdlib --task text --length 80 --continuation 16 --group 16 --residual 16 --calib-n 2 "
            "--valid-n 2 --report-n 4 --num-samples 2 --population 2 --clusters 2 --baselines KV4 K4V2 "
            "--actors 1 --cpus-per-actor 1 --no-fidelity2"
        ),
        kv_budget=3.25,
        prefixkv=_args(
            "--corpus stdlib --data text --samples 2 --workers 1 --cpus-per-worker 1 --context 128 --continuation 16 "
            "--scores window --eval-samples 4 --batch-size 4"
        ),
        keep_ratio=0.5,
        retrieval=_args("--records 2 2 --lengths 96 --calib-n 4 --n 8 --external-n 0 --threads 1 --min-em 0.01"),
        retention=0.5,
        budgets_s={"train_moe": 45, "indexcache": 20, "kvtuner": 75, "prefixkv": 25, "retrieval": 20, "serve": 45},
    )


PRESETS = {"full": full, "smoke": smoke}


def trained(tc: TrainConfig, retrain: bool, run_name: str, killed: str | None = None) -> tuple[str, bool]:
    """(run id of a model trained with exactly this config, whether it was reused); `killed`: the
    resumed demo's unfinished training run, continued from its last checkpoint."""
    if not retrain:
        found = train_moe.find_trained(tc)
        if found:
            print(f"reusing model runs:/{found}/model (same config and corpus; --retrain to train anew)")
            return found, True
    if killed:
        try:
            return train_moe.run(tc, run_name=run_name, resume=killed), False
        except FileNotFoundError as e:  # killed before its first checkpoint: nothing to continue
            print(f"{e}; training anew")
    return train_moe.run(tc, run_name=run_name), False


def prior_stages(parent: str) -> dict[str, tuple[str, str]]:
    """{pipeline: (run id, status)} of the newest run of each pipeline under a demo parent: what a
    resumed demo has already done."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent}'", order_by=["attributes.start_time ASC"], max_results=1000
    )
    return {r.data.tags.get("pipeline", ""): (r.info.run_id, r.info.status) for r in runs}


def child(parent: str, pipeline: str) -> str:
    """The newest run of `pipeline` nested under the demo's parent run."""
    found = prior_stages(parent).get(pipeline)
    if found is None:
        raise RuntimeError(f"the {pipeline} stage logged no run under the demo run {parent}")
    return found[0]


def close_killed(client, experiment_id: str) -> list[str]:
    """Mark FAILED the demo runs (and their children) a kill left RUNNING: a demo killed outright
    never reached its `finally`. Demos do not run side by side (they share Serve's port)."""
    stale = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    for r in stale:
        client.set_tag(r.info.run_id, "note", "left RUNNING by a killed demo; marked FAILED by the next demo")
        client.set_terminated(r.info.run_id, "FAILED")
    return [r.info.run_id for r in stale]


def check_resumable(client, run_id: str, preset: str, parser: argparse.ArgumentParser) -> None:
    """--resume names a demo run of this preset that did not finish (else one line, exit 2)."""
    try:
        tracking.check_run(run_id, "--resume")
    except tracking.TrackingError as e:
        parser.error(str(e))
    run = client.get_run(run_id)
    if run.data.tags.get("pipeline") != "demo":
        parser.error(f"--resume {run_id}: a {run.data.tags.get('pipeline')!r} run, not a demo run")
    if run.data.params.get("preset") != preset:
        parser.error(f"--resume {run_id}: a --preset {run.data.params.get('preset')} demo; pass that preset")
    if run.info.status == "FINISHED":
        parser.error(f"--resume {run_id}: that demo finished; run the demo again for a new one")


def run_stages(
    preset: DemoPreset, console: Console, parent: str, work: Path, retrain: bool, serve: bool, resumed: bool = False
) -> dict:
    """Every stage, in order; returns {stage: run id or result} for the summary. `resumed`: stages
    whose run under `parent` finished are reused, not run again."""
    from benchmarks import kv_retrieval
    from pipelines import indexcache, kvtuner, prefixkv

    n = len(STAGES) - (0 if serve else 1)
    b = preset.budgets_s
    runs: dict = {}
    name = preset.name
    prior = prior_stages(parent) if resumed else {}
    done = {k: rid for k, (rid, status) in prior.items() if status == "FINISHED"}

    def step(i: int, pipeline: str, label: str, fn, *args):
        """Run stage i, or on a resume reuse its finished run (returned as `fn` would: None)."""
        if pipeline in done:
            console.reused(i, n, label, done[pipeline])
            return None
        return console.stage(i, n, label, b[STAGE_OF.get(pipeline, pipeline)], fn, *args)

    killed = prior.get("train_moe", (None, ""))[0] if "train_moe" not in done else None
    moe = step(
        1,
        "train_moe",
        "train DSA-MoE (BIP, expert parallel x2)",
        trained,
        preset.moe,
        retrain,
        f"demo-{name}-dsa-moe-bip-ep2",
        killed,
    )
    moe_run, reused = moe if moe else (done["train_moe"], False)
    runs["train_moe"], runs["train_moe_reused"] = moe_run, reused
    moe_model = f"runs:/{moe_run}/model"
    step(
        2,
        "indexcache",
        "IndexCache greedy search (DSA-MoE)",
        indexcache.main,
        ["--model", moe_model, "--run-name", f"demo-{name}-indexcache-dsa-moe", *preset.indexcache],
    )
    runs["indexcache"] = child(parent, "indexcache")
    kvt_dir = work / "kvtuner"
    kvt = step(
        3,
        "kvtuner",
        f"KVTuner on {REAL_MODEL} (<= {preset.kv_budget:g} bits)",
        kvtuner.main,
        [
            "--model",
            REAL_MODEL,
            "--budget",
            str(preset.kv_budget),
            "--run-name",
            f"demo-{name}-kvtuner-{REAL_MODEL}-text",
            "--work-dir",
            str(kvt_dir),
            *preset.kvtuner,
        ],
    )
    runs["kvtuner"] = kvt["run_id"] if kvt else done["kvtuner"]
    runs["prefixkv"] = (
        step(
            4,
            "prefixkv",
            f"PrefixKV on {REAL_MODEL} (keep {preset.keep_ratio:g})",
            prefixkv.main,
            [
                "--model",
                REAL_MODEL,
                "--eval-ratios",
                str(preset.keep_ratio),
                "--run-name",
                f"demo-{name}-prefixkv-{REAL_MODEL}-text",
                *preset.prefixkv,
            ],
        )
        or done["prefixkv"]
    )
    step(
        5,
        "kv_retrieval",
        f"retrieval with both caches on {REAL_MODEL}",
        kv_retrieval.main,
        [
            "--kvtuner",
            str(kvt_dir),
            "--prefixkv",
            f"runs:/{runs['prefixkv']}/prefixkv.json",
            "--work-dir",
            str(work / "retrieval"),
            "--ratios",
            str(preset.keep_ratio),
            "--run-name",
            f"demo-{name}-kv-retrieval-{REAL_MODEL}",
            *preset.retrieval,
        ],
    )
    runs["retrieval"] = child(parent, "kv_retrieval")
    if serve:
        from pipelines.demo_serve import serve_and_query

        runs["serve"] = console.stage(
            6,
            n,
            f"serve {REAL_MODEL}: calibrated beside full (openai client)",
            b["serve"],
            serve_and_query,
            REAL_MODEL,
            runs["kvtuner"],
            preset.kv_budget,
            runs["prefixkv"],
            preset.serve_keep_ratio,
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="full chain or the 3-minute smoke run")
    p.add_argument("--retrain", action="store_true", help="train the DSA-MoE model even if this config was trained")
    p.add_argument("--no-serve", action="store_true", help="skip the serving stage")
    p.add_argument("--log", type=Path, default=None, help="log file (default artifacts/demo/<preset>-<run id>.log)")
    p.add_argument("--resume", metavar="RUN_ID", default=None, help="finish this killed or failed demo run")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="print only the verdict table")
    loud.add_argument("--verbose", action="store_true", help="print every pipeline's own output too")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]()
    import logging

    from mlflow.tracking import MlflowClient

    from pipelines.demo_summary import summarize
    from workers.runtime.cluster import init_ray

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "creating tables" lines precede the log file
    uri = tracking.check_store()  # before Ray: an unwritable store fails now, naming its path
    exp = tracking.setup(EXPERIMENT)
    client = MlflowClient(uri)
    if a.resume:
        check_resumable(client, a.resume, preset.name, p)
    close_killed(client, exp)
    if a.resume:
        parent = a.resume
        client.update_run(parent, status="RUNNING")
    else:
        parent = client.create_run(exp, run_name=f"demo-{preset.name}", tags=tracking.run_tags("demo")).info.run_id
        budgets = {f"budget_s.{k}": v for k, v in preset.budgets_s.items()}
        tracking.log_params({"preset": preset.name, **budgets}, run_id=parent)
    work = tracking.ARTIFACTS / "demo" / parent
    log = a.log or tracking.ARTIFACTS / "demo" / f"{preset.name}-{parent[:8]}.log"
    verbosity = "quiet" if a.quiet else "verbose" if a.verbose else "normal"
    print(f"calibray demo ({preset.name}), MLflow run {parent} in experiment '{EXPERIMENT}'; log: {log}", flush=True)
    status = "FAILED"
    try:
        with Console(log, verbosity) as console, tracking.nested_under(parent, EXPERIMENT):
            init_ray()
            try:
                runs = run_stages(preset, console, parent, work, a.retrain, not a.no_serve, resumed=bool(a.resume))
                text, table = summarize(runs, preset, console.times, console.elapsed())
            finally:
                import ray

                ray.shutdown()  # inside the redirect: Ray's last forwarded worker lines go to the log too
            console.say(text, always=True)
        client.log_text(parent, text, "summary.md")
        client.log_text(parent, json.dumps({"runs": runs, "table": table}, indent=1, default=str), "summary.json")
        stage_s = {f"stage_s.{tracking.metric_key(k)}": v for k, v in console.times.items()}
        tracking.log_metrics({**stage_s, "total_s": console.elapsed()}, run_id=parent)
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status)
        if status == "FAILED":
            print(
                f"demo FAILED; the log {log} has every stage's output; finish it with: "
                f"python -m pipelines.demo --preset {preset.name} --resume {parent}",
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
