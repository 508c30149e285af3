"""The end-to-end demo on the embedded default: train, calibrate, serve, summarise.

    python -m pipelines.demo                    # the full chain (about 15 minutes on 2 cores, first run)
    python -m pipelines.demo --preset smoke     # a 2-minute version on tiny models
    python -m pipelines.demo --retrain          # do not reuse models already trained with the same config

Stages (each a real pipeline, logged to MLflow, with its own time budget shown as it runs):
1. train the demo DSA-MoE model with BIP balancing, expert parallel over 2 Ray Train workers;
2. IndexCache greedy layer selection on it (calibration actors);
3. train the retrieval testbed (a small Llama-shaped model where the KV cache matters);
4. KVTuner and 5. PrefixKV on both models;
6. start the Ray Serve application with the calibrated configs and send a few requests;
7. print one summary table (each method against its baseline, held-out numbers) and how to
   open the MLflow UI and call the endpoint.
A second run reuses a model trained with the same config (found in MLflow by its config hash).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from pipelines import train_moe
from workers.runtime import cli, tracking
from workers.training.config import TrainConfig, demo, retrieval, tiny


@dataclass(frozen=True)
class DemoPreset:
    name: str
    moe: TrainConfig
    testbed: TrainConfig
    indexcache: list[str] = field(default_factory=list)
    kvtuner_text: list[str] = field(default_factory=list)
    kvtuner_retrieval: list[str] = field(default_factory=list)
    prefixkv_text: list[str] = field(default_factory=list)
    prefixkv_retrieval: list[str] = field(default_factory=list)
    budgets_s: dict[str, int] = field(default_factory=dict)
    serve_retention: float = 0.25  # which IndexCache pattern the calibrated replica serves


def full() -> DemoPreset:
    return DemoPreset(
        name="full",
        moe=demo().replace(num_workers=2, ep_size=2, cpus_per_worker=1.0),
        testbed=retrieval(),
        indexcache=[
            "--retention",
            "0.5",
            "0.25",
            "0.125",
            "--workers",
            "2",
            "--worker-cpus",
            "0.9",
            "--calib-windows",
            "16",
            "--heldout-windows",
            "64",
            "--no-overlap",
        ],
        kvtuner_text=[
            "--budget",
            "4.0",
            "--length",
            "256",
            "--calib-n",
            "8",
            "--valid-n",
            "16",
            "--report-n",
            "64",
            "--num-samples",
            "12",
            "--clusters",
            "4",
            "--actors",
            "2",
            "--cpus-per-actor",
            "0.9",
        ],
        kvtuner_retrieval=[
            "--task",
            "retrieval",
            "--budget",
            "3.0",
            "--length",
            "256",
            "--calib-n",
            "32",
            "--valid-n",
            "64",
            "--report-n",
            "400",
            "--num-samples",
            "12",
            "--clusters",
            "1",
            "--actors",
            "2",
            "--cpus-per-actor",
            "0.9",
        ],
        prefixkv_text=["--samples", "8", "--workers", "2", "--eval-samples", "32", "--cpus-per-worker", "0.9"],
        prefixkv_retrieval=[
            "--data",
            "retrieval",
            "--samples",
            "16",
            "--workers",
            "2",
            "--eval-samples",
            "200",
            "--cpus-per-worker",
            "0.9",
        ],
        budgets_s={
            "train_moe": 300,
            "indexcache": 120,
            "train_testbed": 600,
            "kvtuner": 150,
            "prefixkv": 120,
            "serve": 60,
        },
    )


def smoke() -> DemoPreset:
    small = tiny().replace(steps=30, eval_windows=16)
    return DemoPreset(
        name="smoke",
        serve_retention=0.5,
        moe=small.replace(num_workers=2, ep_size=2, cpus_per_worker=0.5),
        testbed=small.replace(model=small.model.replace(indexer=None, moe=None), preset="tiny-dense"),
        indexcache=[
            "--retention",
            "0.5",
            "--workers",
            "1",
            "--worker-cpus",
            "0.5",
            "--calib-windows",
            "4",
            "--heldout-windows",
            "8",
            "--no-overlap",
        ],
        kvtuner_text=[
            "--budget",
            "4.0",
            "--length",
            "64",
            "--continuation",
            "16",
            "--group",
            "16",
            "--residual",
            "16",
            "--calib-n",
            "4",
            "--valid-n",
            "4",
            "--report-n",
            "8",
            "--num-samples",
            "4",
            "--clusters",
            "2",
            "--actors",
            "1",
            "--cpus-per-actor",
            "0.5",
            "--no-fidelity2",
        ],
        prefixkv_text=[
            "--samples",
            "2",
            "--workers",
            "1",
            "--context",
            "112",
            "--continuation",
            "16",
            "--n-sink",
            "2",
            "--eval-samples",
            "4",
            "--cpus-per-worker",
            "0.5",
        ],
        budgets_s={"train_moe": 40, "indexcache": 20, "train_testbed": 20, "kvtuner": 30, "prefixkv": 20, "serve": 30},
    )


PRESETS = {"full": full, "smoke": smoke}


class Stages:
    """Prints each stage with its budget and elapsed time, so progress is visible throughout."""

    def __init__(self, n: int) -> None:
        self.n, self.i, self.t0, self.times = n, 0, time.perf_counter(), {}

    def run(self, name: str, budget: int, fn, *args, **kwargs):
        self.i += 1
        print(
            f"\n=== [{self.i}/{self.n}] {name} (budget {budget} s, {time.perf_counter() - self.t0:.0f} s so far)",
            flush=True,
        )
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        took = time.perf_counter() - t
        self.times[name] = took
        flag = "" if took <= budget else f"  (over budget by {took - budget:.0f} s)"
        print(f"=== {name}: {took:.0f} s{flag}", flush=True)
        return out


def trained(tc: TrainConfig, retrain: bool, run_name: str) -> str:
    """Run id of a model trained with exactly this config, training it unless one exists."""
    if not retrain:
        found = train_moe.find_trained(tc)
        if found:
            print(f"reusing model runs:/{found}/model (same config and corpus; --retrain to train anew)")
            return found
    return train_moe.run(tc, run_name=run_name)


def latest(pipeline: str) -> str:
    client = MlflowClient(tracking.tracking_uri())
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=f"tags.pipeline = '{pipeline}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id


def metrics(run_id: str) -> dict[str, float]:
    return MlflowClient(tracking.tracking_uri()).get_run(run_id).data.metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="full chain or a 2-minute smoke run")
    p.add_argument("--retrain", action="store_true", help="train models even if the same config was trained before")
    p.add_argument("--no-serve", action="store_true", help="skip starting the Serve application")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]()
    from pipelines import indexcache, kvtuner, prefixkv
    from workers.runtime.cluster import init_ray

    tracking.check_store()  # before Ray: an unwritable store fails now, naming its path
    init_ray()
    st = Stages(7 if not args.no_serve else 6)
    t0 = time.perf_counter()
    moe_run = st.run(
        "train DSA-MoE (BIP, expert parallel x2)",
        preset.budgets_s["train_moe"],
        trained,
        preset.moe,
        args.retrain,
        f"demo-{preset.name}-dsa-moe",
    )
    moe_model = f"runs:/{moe_run}/model"
    st.run(
        "IndexCache greedy search",
        preset.budgets_s["indexcache"],
        indexcache.main,
        ["--model", moe_model, *preset.indexcache],
    )
    ic_run = latest("indexcache")
    tb_run = st.run(
        "train retrieval testbed",
        preset.budgets_s["train_testbed"],
        trained,
        preset.testbed,
        args.retrain,
        f"demo-{preset.name}-testbed",
    )
    tb_model = f"runs:/{tb_run}/model"

    def kv_both():
        # One work dir per model: a retrained model must not resume another model's search.
        text = kvtuner.main(
            [
                "--model",
                moe_model,
                "--run-name",
                f"demo-{preset.name}-kvtuner-text",
                "--work-dir",
                f"artifacts/demo/{preset.name}/kvtuner-text-{moe_run[:8]}",
                *preset.kvtuner_text,
            ]
        )["run_id"]
        ret = None
        if preset.kvtuner_retrieval:
            ret = kvtuner.main(
                [
                    "--model",
                    tb_model,
                    "--run-name",
                    f"demo-{preset.name}-kvtuner-retrieval",
                    "--work-dir",
                    f"artifacts/demo/{preset.name}/kvtuner-retrieval-{tb_run[:8]}",
                    *preset.kvtuner_retrieval,
                ]
            )["run_id"]
        return text, ret

    kv_text, kv_ret = st.run("KVTuner (demo model + testbed)", preset.budgets_s["kvtuner"], kv_both)

    def pkv_both():
        text = prefixkv.main(
            [
                "--model",
                moe_model,
                "--experiment",
                "calibray",
                "--run-name",
                f"demo-{preset.name}-prefixkv-text",
                *preset.prefixkv_text,
            ]
        )
        ret = None
        if preset.prefixkv_retrieval:
            ret = prefixkv.main(
                [
                    "--model",
                    tb_model,
                    "--experiment",
                    "calibray",
                    "--run-name",
                    f"demo-{preset.name}-prefixkv-retrieval",
                    *preset.prefixkv_retrieval,
                ]
            )
        return text, ret

    pkv_text, pkv_ret = st.run("PrefixKV (demo model + testbed)", preset.budgets_s["prefixkv"], pkv_both)
    runs = {
        "train_moe": moe_run,
        "indexcache": ic_run,
        "testbed": tb_run,
        "kvtuner_text": kv_text,
        "kvtuner_retrieval": kv_ret,
        "prefixkv_text": pkv_text,
        "prefixkv_retrieval": pkv_ret,
    }
    served = None
    if not args.no_serve:
        from pipelines.demo_serve import serve_and_query

        served = st.run(
            "Serve with calibrated configs", preset.budgets_s["serve"], serve_and_query, runs, preset.serve_retention
        )
    from pipelines.demo_summary import print_summary

    print_summary(runs, served, time.perf_counter() - t0, st.times)
    (tracking.REPO_ROOT / "artifacts" / "demo").mkdir(parents=True, exist_ok=True)
    (tracking.REPO_ROOT / "artifacts" / "demo" / f"{preset.name}_runs.json").write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
