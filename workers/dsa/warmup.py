"""The dense warm-up of DSA conversion: train only the new indexers, the model frozen, on Ray Train.

DeepSeek's stage that turned V3.1 into V3.2: every layer's indexer is fitted by
KL(head-summed, L1-normalised dense attention || softmax(indexer logits)) while the model runs
dense attention and stays frozen. The loss of one step is the mean of the layers' KLs; each layer's
indexer reads its layer's (detached) input, so layers train independently in one forward.

`warmup_loop` is the per-worker function of a `ray.train.torch.TorchTrainer`: every rank loads the
dense model, adds the same seeded indexers, draws its own rows of each step's batch, and the
indexer gradients are averaged over ranks (gloo on CPU, NCCL on GPU). Rank 0 logs to MLflow (the one
writer inside a fit) and reports the final indexer weights as the Ray Train checkpoint.

Shape legend: R train windows, B rows per rank and step, L tokens per window.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workers.model.config import IndexerConfig

CHECKPOINT_FILE = "indexers.safetensors"
HISTORY_FILE = "kl_history.json"


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 200
    batch_size: int = 4  # rows per step, over all ranks
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 10
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")


def load_with_indexers(model_dir: str, icfg: IndexerConfig, seed: int):
    """The dense model at `model_dir` (fp32, frozen) with fresh seeded indexers -> (hf, indexer params)."""
    from transformers import AutoModelForCausalLM

    from workers.model.hf.lightning import add_indexers

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    hf.requires_grad_(False)
    params = [p for ix in add_indexers(hf, icfg, seed) for p in ix.parameters()]
    for p in params:
        p.requires_grad_(True)
    return hf, params


def layer_kls(hf, inputs: torch.Tensor) -> torch.Tensor:
    """Per-layer indexer KL to the dense attention on inputs [B, L] -> [N] (differentiable in the indexers)."""
    from workers.model.hf.lightning import attention_mode

    with attention_mode(hf, "dense", train_kl=True) as attns:
        hf.model(inputs)  # the head is not needed: the loss lives in the attention layers
        return torch.stack([a.dsa_kl for a in attns])


@torch.no_grad()
def eval_kls(hf, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean per-layer KL over windows [R, L] -> [N] (no gradient)."""
    total = None
    for i in range(0, windows.shape[0], batch_size):
        kl = layer_kls(hf, windows[i : i + batch_size]) * min(batch_size, windows.shape[0] - i)
        total = kl if total is None else total + kl
    return total / windows.shape[0]


def batch_rows(step: int, n_rows: int, cfg: WarmupConfig, rank: int, world: int) -> torch.Tensor:
    """This rank's share of step's batch: the same draw on every rank, split by rank."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows = torch.randint(0, n_rows, (cfg.batch_size,), generator=g)
    return rows[rank::world]


def warmup_loop(config: dict) -> None:
    """config: {"model_dir", "indexer" (IndexerConfig dict), "warmup" (WarmupConfig dict), "windows" [R, L],
    "run_id", "tracking_uri"}."""
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    from workers.model.hf.lightning import indexer_state

    cfg = WarmupConfig(**config["warmup"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    hf, params = load_with_indexers(config["model_dir"], IndexerConfig(**config["indexer"]), cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    windows: torch.Tensor = config["windows"]
    client = None
    if rank == 0 and config.get("run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["tracking_uri"])
    history, t0 = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        rows = batch_rows(step, windows.shape[0], cfg, rank, world)
        kls = layer_kls(hf, windows[rows])
        loss = kls.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        history.append(float(loss.detach()))
        if client is not None and (step % cfg.log_every == 0 or step in (1, cfg.steps)):
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            m = {"warmup/indexer_kl": history[-1], "warmup/s_per_step": (time.perf_counter() - t0) / step}
            m.update({f"warmup/indexer_kl/layer_{i}": float(v) for i, v in enumerate(kls.detach())})
            client.log_batch(config["run_id"], metrics=[Metric(k, v, ts, step) for k, v in m.items()])
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_file(indexer_state(hf), str(Path(d) / CHECKPOINT_FILE))
            (Path(d) / HISTORY_FILE).write_text(json.dumps({"kl": history, "config": asdict(cfg)}))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"step": cfg.steps, "indexer_kl": history[-1]}, checkpoint=checkpoint)
