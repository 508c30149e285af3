"""Train a calibray model (DSA-MoE, dense Llama-shaped, or the retrieval testbed) on Ray Train.

Examples (embedded default: local Ray, MLflow in ./mlruns.db, CPU)::

    python -m pipelines.train_moe --preset tiny                  # seconds, for a smoke test
    python -m pipelines.train_moe --preset demo --workers 2      # the demo DSA-MoE model
    python -m pipelines.train_moe --preset retrieval             # the retrieval testbed
    python -m pipelines.train_moe --preset demo --resume <run_id>  # continue a crashed run
    python -m pipelines.train_moe --model hf:<dir> --router bip  # fine-tune a transformers MoE model

On a cluster: ``ray job submit --address ... --working-dir . -- python -m pipelines.train_moe
--preset demo --workers 8 --storage s3://bucket/ray`` (storage every node reaches) with
MLFLOW_TRACKING_URI pointing at the head's mlflow server.
The trained model is the MLflow artifact ``model`` (address ``runs:/<run_id>/model``).

Resume (docs/RELIABILITY.md): checkpoints live in Ray Train's storage under the run name
``train-<first run id>``; ``--resume <run_id>`` starts a new MLflow run (tag ``resumed_from``,
the old one is marked FAILED if it was left RUNNING) whose fit has the same Ray Train name and
storage, so Ray Train restores it, starting from the newest complete checkpoint in that storage
(one written after the driver died included). A run whose training had finished is evaluated
and its model logged without training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys

import mlflow

from workers.data.corpus import load_corpus
from workers.data.shards import write_shards
from workers.model.config import ConfigError
from workers.runtime import cli, storage, tracking
from workers.training import train_state
from workers.training.config import RECIPES, TrainConfig, parse_curriculum, recipe
from workers.training.evaluate import final_report
from workers.training.ray_train import fit, train_loop

ARTIFACTS = tracking.ARTIFACTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_moe", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(RECIPES), help="named recipe (model + schedule)")
    p.add_argument(
        "--model",
        metavar="hf:DIR",
        help="fine-tune this transformers MoE model (qwen3_moe, olmoe, mixtral, deepseek_v3) instead of a "
        "preset; see pipelines/train_moe_hf.py",
    )
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per worker per step")
    p.add_argument("--seq-len", type=int, help="training sequence length in bytes")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--dense-warmup-steps", type=int, help="DSA: dense steps before sparse attention")
    p.add_argument("--seed", type=int, help="seed for weights and data order")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (and at the last step)")
    p.add_argument("--storage", help=storage.HELP)
    p.add_argument("--ep-size", type=int, help="expert-parallel group size (MoE)")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage for dense parameters (0, 1, 2)")
    p.add_argument("--n-layers", type=int, help="model: layers")
    p.add_argument("--d-model", type=int, help="model: width")
    p.add_argument("--n-heads", type=int, help="model: attention heads")
    p.add_argument("--n-kv-heads", type=int, help="model: key/value heads (GQA)")
    p.add_argument("--topk", type=int, help="model: DSA top-k")
    p.add_argument("--n-experts", type=int, help="model: MoE experts")
    p.add_argument("--router", choices=["none", "aux_loss", "loss_free", "bip"], help="MoE routing strategy")
    p.add_argument("--bip-mode", choices=["pre", "causal"], help="BIP: route with this batch's prices or last step's")
    p.add_argument("--bip-iters", type=int, help="BIP: dual rounds T per batch")
    p.add_argument(
        "--bip-q-mode", choices=["carry", "restart"], help="BIP: start the rounds from last step's q (carry) or 0"
    )
    p.add_argument("--corpus", help="'pydoc' (default) or a .txt / .jsonl / .parquet file with a text column")
    p.add_argument(
        "--curriculum",
        help="retrieval warm-up stages, comma-separated filler:length:min-max records:q<queries>:steps "
        "(e.g. blank:64:1-1:q1:1000,text:64:2-4:q3:1000), or none",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the pipeline's own)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument(
        "--resume", metavar="RUN_ID", help="continue the training of this MLflow run from its last checkpoint"
    )
    return p


def _given(**values):
    """The keyword arguments that were actually given on the command line."""
    return {k: v for k, v in values.items() if v is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe + overrides, validated (a bad value raises a ConfigError naming it)."""
    tc = recipe(args.preset)
    m = tc.model
    model_changes = _given(
        n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads
    )
    if args.topk is not None:
        if m.indexer is None:
            raise ConfigError(f"--topk={args.topk}: preset {args.preset!r} has no indexer")
        model_changes["indexer"] = dataclasses.replace(m.indexer, topk=args.topk)
    if any(v is not None for v in (args.n_experts, args.router, args.bip_mode, args.bip_iters, args.bip_q_mode)):
        if m.moe is None:
            raise ConfigError(f"--n-experts/--router/--bip-*: preset {args.preset!r} has no MoE")
        router = dataclasses.replace(
            m.moe.router,
            **_given(
                strategy=args.router, bip_mode=args.bip_mode, bip_iters=args.bip_iters, bip_q_mode=args.bip_q_mode
            ),
        )
        model_changes["moe"] = dataclasses.replace(m.moe, router=router, **_given(n_experts=args.n_experts))
    if model_changes:
        m = m.replace(**model_changes)
    changes = {"model": m}
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "lr",
        "dense_warmup_steps",
        "seed",
        "ep_size",
        "zero_stage",
        "cpus_per_worker",
        "ckpt_every",
        "corpus",
    ):
        v = getattr(args, name)
        if v is not None:
            changes[name] = v
    if args.workers is not None:
        changes["num_workers"] = args.workers
    if args.curriculum is not None:
        changes["curriculum"] = parse_curriculum(args.curriculum)
    return tc.replace(**changes)


def config_sha(tc: TrainConfig, corpus_sha: str) -> str:
    """Identity of a training setup: same config on the same corpus = same model (reusable)."""
    blob = json.dumps({"train": tc.to_dict(), "corpus": corpus_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_trained(tc: TrainConfig) -> str | None:
    """The newest FINISHED run, in any experiment of the store, that trained exactly this config on
    this corpus (a model the demo trained is found by `train_moe` and the other way round)."""
    from mlflow.tracking import MlflowClient

    tracking.setup()
    sha = config_sha(tc, load_corpus(tc.corpus).sha256)
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.config_sha = '{sha}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run(
    tc: TrainConfig,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    storage_uri: str | None = None,
    extra: dict | None = None,
) -> str:
    """Train, evaluate on held-out data, log everything; returns the MLflow run id."""
    tracking.check_store()  # before anything is written: an unwritable store is named in seconds
    if resume:
        tracking.check_run(resume)  # without creating an empty store where there is none
    corpus = load_corpus(tc.corpus)
    write_shards(corpus, ARTIFACTS / "data")
    tags = {"corpus_sha256": corpus.sha256, "preset": tc.preset, "config_sha": config_sha(tc, corpus.sha256)}
    found = None
    if resume:
        tracking.setup(experiment)
        found = train_state.resume_from(resume, storage_uri)
        tags.update(found.tags())
    with tracking.start_run(
        "train_moe",
        experiment=experiment,
        run_name=run_name or f"train-{tc.preset}",
        params={**tc.flat_params(), **corpus.summary()},
        tags=tags,
    ) as active:
        run_id = active.info.run_id
        print(f"MLflow run {run_id} ({tracking.tracking_uri()})", flush=True)
        loop_config = {"train_tokens": corpus.tokens("train"), "filler": corpus.train, **(extra or {})}
        ckpt = fit(train_loop, tc, run_id, loop_config, resume=found, storage_given=storage_uri)
        model_dir, metrics = final_report(tc, ckpt, corpus)
        tracking.log_metrics(metrics)
        mlflow.log_artifacts(str(model_dir / "model"), "model")
        from workers.model.mlflow_model import log_calib_lm, log_hf_model

        log_calib_lm(model_dir / "model")  # the same checkpoint as an MLflow model (pyfunc, signature)
        if (model_dir / "hf_model").exists():
            log_hf_model(model_dir / "hf_model")
        for k, v in sorted(metrics.items()):
            print(f"  {k:32s} {v:.4f}")
    print(f"model: runs:/{run_id}/model")
    print(f"browse: mlflow ui --backend-store-uri {tracking.tracking_uri()} --host 127.0.0.1")
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None:
        from pipelines import train_moe_hf

        return train_moe_hf.main(args)
    tc = config_from_args(args)
    run(tc, experiment=args.experiment, run_name=args.run_name, resume=args.resume, storage_uri=args.storage)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
