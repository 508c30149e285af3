"""The `--model hf:<dir>` half of pipelines.train_moe: fine-tune a transformers MoE model.

Examples (embedded default: local Ray, MLflow in ./mlruns.db, CPU)::

    python -m pipelines.train_moe --model hf:/path/qwen3_moe --router bip --steps 100
    python -m pipelines.train_moe --model hf:/path/qwen3_moe --workers 2 --ep-size 2 --router loss_free
    python -m pipelines.train_moe --model hf:/path/qwen3_moe --resume <run_id>   # continue a crashed run

Families: qwen3_moe, olmoe, mixtral, deepseek_v3 (workers/model/hf/moe.py says how each routes).
The corpus is tokenized with the model's own tokenizer (its files beside config.json; a model
without them needs a 256-token vocabulary, the byte tokenizer). The result is the MLflow
artifact ``hf_model``: a plain transformers checkpoint (``AutoModelForCausalLM.from_pretrained``)
with the tokenizer files and the routers' balancing state (``calibray_routing.safetensors``).
Checkpoints, ``--storage``, ``--ckpt-every`` and ``--resume`` work as for the project's models
(pipelines/train_moe.py; one mechanism, ``train_state.find_resume`` and ``ray_train.fit``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from workers.model.config import ConfigError, RouterConfig
from workers.model.mlflow_model import log_hf_model
from workers.runtime import tracking
from workers.training import train_state
from workers.training.hf_moe import HFMoETrainConfig, read_hf_config, train_loop
from workers.training.ray_train import fit

# flags of the project's recipes that describe a model or schedule the HF model does not have
NOT_FOR_HF = ("n_layers", "d_model", "n_heads", "n_kv_heads", "topk", "n_experts", "dense_warmup_steps", "curriculum")
NOT_FOR_HF += ("zero_stage",)  # ZeRO around a transformers model is not wired (nor tested) here


def config_from_args(args: argparse.Namespace) -> HFMoETrainConfig:
    """--model hf:<dir> plus overrides, validated against the model's config.json."""
    for name in NOT_FOR_HF:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}={getattr(args, name)!r}: does not apply to --model {args.model}")
    given = {
        k: v
        for k, v in dict(strategy=args.router, bip_mode=args.bip_mode, bip_iters=args.bip_iters).items()
        if v is not None
    }
    if args.bip_q_mode is not None:
        given["bip_q_mode"] = args.bip_q_mode
    changes = {
        name: getattr(args, name)
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "seed",
            "ep_size",
            "cpus_per_worker",
            "ckpt_every",
            "corpus",
        )
        if getattr(args, name) is not None
    }
    if args.workers is not None:
        changes["num_workers"] = args.workers
    return HFMoETrainConfig(model=args.model, router=RouterConfig(**given), **changes)


@torch.no_grad()
def final_report(tc: HFMoETrainConfig, ckpt_dir: Path, windows: torch.Tensor, tokenizer) -> tuple[Path, dict]:
    """The final state exported as a transformers checkpoint; held-out NLL and MaxVio (eval routing)."""
    from workers.eval import heldout_nll
    from workers.model.hf.moe import export_hf, heldout_loads
    from workers.model.moe.balancing import max_vio
    from workers.training.hf_moe import build
    from workers.training.train_state import load_model_state

    lm = build(tc)
    lm.load_state_dict(load_model_state(ckpt_dir))
    lm.eval()
    metrics = heldout_nll(lm, windows, tokenizer=tokenizer).as_metrics("heldout")
    metrics["heldout_windows"] = float(windows.shape[0])
    vios = [float(max_vio(load)) for load in heldout_loads(lm, windows)]
    metrics.update({f"heldout_maxvio/layer_{i}": v for i, v in enumerate(vios)})
    metrics["heldout_global_maxvio"] = sum(vios) / len(vios)
    metrics["num_params"] = float(sum(p.numel() for p in lm.parameters()))
    out = Path(tempfile.mkdtemp(prefix="calibray-hf-moe-")) / "hf_model"
    export_hf(lm, out, tc.model_dir)
    return out, metrics


def run(
    tc: HFMoETrainConfig,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    storage_uri: str | None = None,
    extra: dict | None = None,
) -> str:
    """Fine-tune, evaluate on held-out data, export, log everything; returns the MLflow run id."""
    from workers.data.corpus import load_corpus
    from workers.model.hf.address import check_weights, load_tokenizer

    tracking.check_store()
    if resume:
        tracking.check_run(resume)
    config = read_hf_config(tc.model)
    tokenizer = load_tokenizer(tc.model)
    check_weights(tc.model)
    corpus = load_corpus(tc.corpus)
    train_tokens = corpus.tokens("train", tokenizer)
    windows = corpus.eval_windows("heldout", tc.seq_len, tc.eval_windows, tokenizer=tokenizer)
    if train_tokens.numel() <= tc.seq_len:
        raise ConfigError(f"seq_len={tc.seq_len}: the train split has only {train_tokens.numel()} tokens")
    tags = {"corpus_sha256": corpus.sha256, "preset": tc.preset, "model_type": config.model_type}
    found = None
    if resume:
        tracking.setup(experiment)
        found = train_state.resume_from(resume, storage_uri)
        tags.update(found.tags())
    with tracking.start_run(
        "train_moe",
        experiment=experiment,
        run_name=run_name or f"finetune-{config.model_type}-{tc.router.strategy}",
        params={**tc.flat_params(), **corpus.summary(), "tokenizer": tokenizer.name},
        tags=tags,
    ) as active:
        run_id = active.info.run_id
        print(f"MLflow run {run_id} ({tracking.tracking_uri()})", flush=True)
        loop_config = {"train_tokens": train_tokens, **(extra or {})}
        ckpt = fit(train_loop, tc, run_id, loop_config, resume=found, storage_given=storage_uri)
        hf_dir, metrics = final_report(tc, ckpt, windows, tokenizer)
        tracking.log_metrics(metrics)
        log_hf_model(hf_dir)  # + the transformers-flavour MLflow model
        for k, v in sorted(metrics.items()):
            print(f"  {k:32s} {v:.4f}")
    print(f"model: runs:/{run_id}/hf_model")
    return run_id


def main(args: argparse.Namespace) -> int:
    tc = config_from_args(args)
    run(tc, experiment=args.experiment, run_name=args.run_name, resume=args.resume, storage_uri=args.storage)
    return 0
