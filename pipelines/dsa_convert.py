"""DSA conversion: a dense HF Llama-family model becomes a DSA model (a lightning indexer per layer).

    python -m pipelines.dsa_convert --model smollm2-135m --seq-len 512 --steps 200 --batch-size 4
    python -m pipelines.dsa_convert --model hf:<dense llama dir> --topk 64 --workers 2 --cpus-per-worker 1
    ray job submit --working-dir . -- python -m pipelines.dsa_convert --model hf:/ckpt/llama

DeepSeek's dense warm-up (V3.1 -> V3.2): every attention layer gets a lightning indexer (Hi heads of
width Di, weights w; logits sum_h w_th relu(q_th . k_s), the project's CalibLM indexer), and only the
indexers are trained, on Ray Train, by KL to the dense model's head-summed attention; the model is
frozen. The converted checkpoint is logged as the run's `hf_model` artifact (address
`runs:/<run_id>/hf_model`, param `topk`), which `pipelines.indexcache` searches like any DSA model.

Reported on held-out windows the warm-up never saw: NLL with dense attention, sparse attention over
its own indexer's top-k, and k random earlier positions, at k = --topk and every --quality-topk
(paired differences with standard errors), and the per-layer indexer KL before and after training.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import torch

from workers.model.config import IndexerConfig
from workers.model.hf.address import ADDRESS_HELP, config_file, load_tokenizer, local_dir
from workers.model.mlflow_model import log_hf_model
from workers.runtime import cli, tracking

log = logging.getLogger("pipelines.dsa_convert")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")


@dataclass(frozen=True)
class ConvertConfig:
    """Everything a conversion depends on; validated before any work starts."""

    model: str
    seq_len: int = 512
    topk: int = 0  # 0: seq_len // 8
    index_heads: int = 4
    index_dim: int = 32
    index_rope_dim: int = 16
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    corpus: str = "stdlib"
    split_seed: int = 0
    train_windows: int = 2048
    heldout_windows: int = 32
    kl_windows: int = 8
    quality_topks: tuple[int, ...] = ()  # extra k for the quality table (default: seq_len // 4)
    workers: int = 1
    cpus_per_worker: float = 2.0
    threads: int = 2
    log_every: int = 10
    experiment: str | None = None
    tags: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len!r}: must be >= 2")
        if self.topk == 0:
            object.__setattr__(self, "topk", max(1, self.seq_len // 8))
        if not self.quality_topks:
            object.__setattr__(self, "quality_topks", (max(1, self.seq_len // 4),))
        object.__setattr__(self, "quality_topks", tuple(int(k) for k in self.quality_topks))
        self.indexer()  # validates heads / dims / topk
        for k in (self.topk, *self.quality_topks):
            if not 1 <= k < self.seq_len:
                raise ValueError(f"topk={k!r}: must be in [1, seq_len={self.seq_len}) (k = L keeps every key)")
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= self.workers,
            "train_windows": self.train_windows >= 1,
            "heldout_windows": self.heldout_windows >= 2,
            "kl_windows": self.kl_windows >= 1,
            "workers": self.workers >= 1,
            "cpus_per_worker": self.cpus_per_worker > 0,
            "threads": self.threads >= 1,
            "log_every": self.log_every >= 1,
            "lr": self.lr > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid (batch_size must be >= workers)")

    def indexer(self) -> IndexerConfig:
        return IndexerConfig(self.index_heads, self.index_dim, self.index_rope_dim, self.topk)

    def warmup(self) -> dict:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "log_every": self.log_every,
            "threads": max(1, int(self.cpus_per_worker)),
        }


def check_model(cfg: ConvertConfig) -> None:
    """Refuse, from config.json alone (before Ray or MLflow start), a model this converter cannot convert."""
    from transformers import AutoConfig

    from workers.model.hf import HFModelError
    from workers.model.hf.address import check_weights, is_hf_config, read_config
    from workers.model.hf.lightning import check_convertible

    path = config_file(cfg.model)
    if not is_hf_config(read_config(cfg.model)):
        raise HFModelError(f"model={cfg.model!r} is a CalibLM checkpoint; dsa_convert converts Hugging Face models")
    c = AutoConfig.from_pretrained(path.parent, local_files_only=True)
    check_convertible(c, cfg.model)
    if cfg.seq_len > c.max_position_embeddings:
        raise ValueError(
            f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={c.max_position_embeddings}"
        )
    check_weights(cfg.model)


@dataclass
class Data:
    train: torch.Tensor  # [Rt, L] warm-up inputs
    heldout: torch.Tensor  # [Rh, L + 1] quality windows (inputs + next token)
    kl: torch.Tensor  # [Rk, L] held-out KL windows
    summary: dict


def load_data(cfg: ConvertConfig, tokenizer) -> Data:
    from workers.data.corpus import SplitConfig, load_corpus

    corpus = load_corpus(cfg.corpus, SplitConfig(seed=cfg.split_seed))
    train = corpus.eval_windows("train", cfg.seq_len, cfg.train_windows, tokenizer)
    heldout = corpus.eval_windows("heldout", cfg.seq_len + 1, cfg.heldout_windows, tokenizer)
    if heldout.shape[0] < 2:
        raise ValueError(f"seq_len={cfg.seq_len}: the held-out split holds {heldout.shape[0]} window(s), need 2")
    kl = heldout[: cfg.kl_windows, :-1]
    summary = {**corpus.summary(), "tokenizer": tokenizer.name, "train_windows_resolved": train.shape[0]}
    summary["heldout_windows_resolved"] = heldout.shape[0]
    return Data(train, heldout, kl, summary)


def fit(cfg: ConvertConfig, model_dir: Path, train: torch.Tensor, run_id: str) -> Path:
    """The Ray Train warm-up; -> the local directory of its final checkpoint (indexer weights)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.dsa.warmup import warmup_loop

    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        warmup_loop,
        train_loop_config={
            "model_dir": str(model_dir),
            "indexer": asdict(cfg.indexer()),
            "warmup": cfg.warmup(),
            "windows": train,
            "run_id": run_id,
            "tracking_uri": tracking.tracking_uri(),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"dsa-convert-{run_id}", storage_path=str(tracking.REPO_ROOT / "artifacts" / "ray_results")
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("the warm-up finished without a checkpoint")
    return Path(result.checkpoint.path)


def write_converted(hf, model_dir: Path, out: Path) -> Path:
    """The converted folder: weights + config from `hf`, tokenizer (and other non-weight files) from the source."""
    from workers.model.hf.lightning import save_converted

    save_converted(hf, out)
    for f in model_dir.iterdir():
        if (
            f.is_file()
            and f.name != "config.json"
            and not f.name.endswith(WEIGHT_SUFFIXES)
            and not (out / f.name).exists()
        ):
            shutil.copy(f, out / f.name)
    return out


def run(cfg: ConvertConfig) -> dict:
    """Convert, report and log in one MLflow run; returns the summary."""
    from safetensors.torch import load_file

    from workers.dsa.quality import quality_table, table_rows
    from workers.dsa.warmup import CHECKPOINT_FILE, HISTORY_FILE, eval_kls, load_with_indexers
    from workers.indexcache.report import log_rows
    from workers.runtime.cluster import init_ray

    check_model(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg, tokenizer)
    model_dir = local_dir(cfg.model)
    torch.set_num_threads(cfg.threads)
    params = {**{k: v for k, v in asdict(cfg).items() if k != "tags"}, **data.summary}
    with tracking.start_run("dsa_convert", experiment=cfg.experiment, params=params, tags=cfg.tags) as active:
        run_id = active.info.run_id
        init_ray()
        started = time.perf_counter()
        ckpt = fit(cfg, model_dir, data.train, run_id)
        train_s = time.perf_counter() - started
        history = json.loads((ckpt / HISTORY_FILE).read_text())["kl"]
        hf, _ = load_with_indexers(str(model_dir), cfg.indexer(), cfg.seed)  # the warm-up's starting point
        hf.eval()
        kl_before = eval_kls(hf, data.kl)
        missing, unexpected = hf.load_state_dict(load_file(str(ckpt / CHECKPOINT_FILE)), strict=False)
        if unexpected or any(".indexer." in k for k in missing):
            raise RuntimeError(f"checkpoint does not match the indexers: {unexpected or missing}")
        kl_after = eval_kls(hf, data.kl)
        table = quality_table(hf, data.heldout, [cfg.topk, *cfg.quality_topks])
        kl_rows = [
            {"layer": i, "kl_before": float(b), "kl_after": float(a)}
            for i, (b, a) in enumerate(zip(kl_before, kl_after))
        ]
        log_rows(kl_rows, "dsa/layer_kl.json")
        log_rows(table_rows(table), "dsa/quality.json")
        mlflow.log_text(json.dumps(table, indent=1), "dsa/quality_full.json")
        metrics = {
            "warmup/wall_s": train_s,
            "warmup/train_kl_first": history[0],
            "warmup/train_kl_last": history[-1],
            "heldout/indexer_kl_before": float(kl_before.mean()),
            "heldout/indexer_kl_after": float(kl_after.mean()),
            "heldout/dense_nll": table["dense"],
        }
        for k, e in table["k"].items():
            metrics.update({f"heldout/k{k}/sparse_nll": e["sparse"], f"heldout/k{k}/random_nll": e["random"]})
            for name in ("sparse_minus_dense", "random_minus_dense", "sparse_minus_random"):
                metrics[f"heldout/k{k}/{name}"] = e[name]["mean"]
                metrics[f"heldout/k{k}/{name}_se"] = e[name]["se"]
        tracking.log_metrics(metrics)
        mlflow.log_param("topk", cfg.topk)
        with tempfile.TemporaryDirectory() as d:
            write_converted(hf, model_dir, Path(d) / "hf_model")
            log_hf_model(Path(d) / "hf_model")  # + the transformers-flavour MLflow model
        return {
            "run_id": run_id,
            "model": f"runs:/{run_id}/hf_model",
            "topk": cfg.topk,
            "metrics": metrics,
            "quality": table,
        }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"a dense Llama-family HF model: {ADDRESS_HELP}")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (training and reports)")
    p.add_argument("--topk", type=int, default=0, help="keys each query keeps (0: seq-len / 8)")
    p.add_argument(
        "--quality-topk", type=int, nargs="+", default=[], help="extra k for the quality table (default seq-len / 4)"
    )
    p.add_argument("--index-heads", type=int, default=4, help="indexer heads Hi")
    p.add_argument("--index-dim", type=int, default=32, help="indexer head width Di")
    p.add_argument("--index-rope-dim", type=int, default=16, help="dims of Di that get RoPE")
    p.add_argument("--steps", type=int, default=200, help="warm-up steps")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (over all workers)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the indexers")
    p.add_argument("--seed", type=int, default=0, help="indexer initialisation and batch order")
    p.add_argument("--corpus", default="stdlib", help="'stdlib', 'pydoc' or a .txt/.jsonl/.parquet path")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/calib/held-out split")
    p.add_argument("--train-windows", type=int, default=2048, help="train windows the batches are drawn from")
    p.add_argument("--heldout-windows", type=int, default=32, help="held-out windows of the quality table")
    p.add_argument("--kl-windows", type=int, default=8, help="held-out windows of the KL before/after")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=2.0, help="Ray CPUs (and torch threads) per worker")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the driver's reports")
    p.add_argument("--log-every", type=int, default=10, help="MLflow metrics every N steps")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the pipeline's own)")
    a = p.parse_args(argv)
    tracking.check_store()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = ConvertConfig(
        model=a.model,
        seq_len=a.seq_len,
        topk=a.topk,
        index_heads=a.index_heads,
        index_dim=a.index_dim,
        index_rope_dim=a.index_rope_dim,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        corpus=a.corpus,
        split_seed=a.split_seed,
        train_windows=a.train_windows,
        heldout_windows=a.heldout_windows,
        kl_windows=a.kl_windows,
        quality_topks=tuple(a.quality_topk),
        workers=a.workers,
        cpus_per_worker=a.cpus_per_worker,
        threads=a.threads,
        log_every=a.log_every,
        experiment=a.experiment,
    )
    check_model(cfg)  # a missing, non-Llama or already converted model fails here, before Ray starts
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("run_id", "model", "topk", "metrics")}, indent=1))
    return summary


if __name__ == "__main__":
    cli.run(main)
