"""Fine-tuning a transformers MoE model (`hf:<dir>`) expert parallel on Ray Train.

The model's selection is replaced by one of the project's strategies (`workers.model.hf.moe`),
its experts are split over the expert-parallel group (E / ep_size per rank, the fused
`gate_up_proj` / `down_proj` sliced by expert) and trained with `MoEOptimizer` (dense
gradients over all ranks, expert gradients over the replicas of each expert). The steps run
through `loop.run_steps` with the hooks of `ray_train` (MaxVio, loads and metrics per layer
to MLflow from rank 0, checkpoints in the `train_state` layout, fault injection), so a
replaced worker or `--resume` continues from the last checkpoint as for the project's models.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.model.config import ConfigError, RouterConfig
from workers.training.schedule import LRSchedule, Objective

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


def _hf_dir(address: str) -> Path:
    if not address.startswith("hf:"):
        raise ConfigError(f"model={address!r}: MoE fine-tuning takes an hf:<dir> address")
    return Path(address[3:]).expanduser()


def read_hf_config(address: str):
    """The transformers config of `hf:<dir>` (config.json only), refused unless a supported MoE family."""
    from transformers import AutoConfig

    from workers.model.hf.moe import family_of

    path = _hf_dir(address)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model={address!r}: no config.json in {path}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model={address!r}: config.json does not load ({e})") from None
    family_of(config)
    return config


@dataclass(frozen=True)
class HFMoETrainConfig:
    """A fine-tuning run of a transformers MoE model; validated against its config.json."""

    model: str  # hf:<dir>
    router: RouterConfig = field(default_factory=RouterConfig)
    steps: int = 60
    batch_size: int = 8  # sequences per worker
    seq_len: int = 128  # in the model's tokens
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    ep_size: int = 1
    dtype: str = "fp32"
    eval_windows: int = 64
    log_every: int = 5
    ckpt_every: int = 50
    max_failures: int = 2
    corpus: str = "pydoc"
    preset: str = "hf"  # what the run is tagged with (the recipes' name field)
    task: str = "text"  # the batches of workers.training.batches: plain text windows

    def __post_init__(self) -> None:
        from workers.model.hf.moe import check_router, moe_shape

        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        config = read_hf_config(self.model)
        # absolute: Ray Train workers run in their own working directory
        object.__setattr__(self, "model", f"hf:{self.model_dir.resolve()}")
        check_router(config, self.router)
        n_experts, _ = moe_shape(config)
        self.schedule  # noqa: B018 - constructing it checks lr, steps, warm-up, min_lr_frac
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        limit = int(getattr(config, "max_position_embeddings", self.seq_len))
        check(2 <= self.seq_len <= limit, "seq_len", f"must be in [2, max_position_embeddings={limit}]")
        check(self.grad_clip > 0, "grad_clip", "must be > 0")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        check(
            self.ep_size >= 1 and self.num_workers % self.ep_size == 0,
            "ep_size",
            f"must divide num_workers={self.num_workers}",
        )
        check(n_experts % self.ep_size == 0, "ep_size", f"must divide the model's {n_experts} experts")
        check(self.dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}")
        check(self.eval_windows >= 1, "eval_windows", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.ckpt_every >= 1, "ckpt_every", "must be >= 1")
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        check(self.task == "text", "task", "MoE fine-tuning trains on text")

    @property
    def model_dir(self) -> Path:
        return _hf_dir(self.model)

    @property
    def schedule(self) -> LRSchedule:
        return LRSchedule(lr=self.lr, steps=self.steps, warmup_steps=self.warmup_steps, min_lr_frac=self.min_lr_frac)

    @property
    def objective(self) -> Objective:
        return Objective()  # LM loss + the strategy's aux loss; no indexer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFMoETrainConfig:
        d = dict(d)
        d["router"] = RouterConfig(**d["router"])
        return cls(**d)

    def replace(self, **changes: Any) -> HFMoETrainConfig:
        return dataclasses.replace(self, **changes)

    def flat_params(self) -> dict[str, Any]:
        out = {f"train.{k}": v for k, v in self.to_dict().items() if k != "router"}
        out.update({f"router.{k}": v for k, v in dataclasses.asdict(self.router).items()})
        return out


def build(tc: HFMoETrainConfig):
    """The model of a run, unsharded: transformers weights from the dir, the run's router installed."""
    from transformers import AutoModelForCausalLM

    from workers.model.hf.moe import HFMoELM, install

    hf = AutoModelForCausalLM.from_pretrained(tc.model_dir, dtype=DTYPES[tc.dtype], local_files_only=True)
    install(hf, tc.router)
    return HFMoELM(hf)


class HFExpertParallel:
    """The layout of every HF fine-tune: experts sharded over each expert-parallel group."""

    replicated = False  # each rank holds its own experts' optimizer state

    def __init__(self, tc: HFMoETrainConfig) -> None:
        from workers.model.moe.expert_parallel import init_ep_groups

        self.tc = tc
        self.groups = init_ep_groups(tc.ep_size)  # collective: every rank

    def optimizer(self, lm):
        from workers.model.hf.moe import shard
        from workers.training.moe_optim import MoEOptimizer

        shard(lm, self.groups)
        tc = self.tc
        return MoEOptimizer(
            lm, self.groups, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, micro_batch=tc.batch_size
        )

    def full_state(self, lm) -> dict:
        from workers.model.hf.moe import full_state_dict

        return full_state_dict(lm)  # collective over each expert-parallel group


def train_loop(config: dict) -> None:
    """The Ray Train worker: config = {"train": HFMoETrainConfig dict, "train_tokens", "run_id",
    "tracking_uri", "resume_uri", and the fault injection of ``ray_train.checkpoint_and_faults``}."""
    import ray.train

    from workers.model.moe.metrics import MaxVioTracker
    from workers.training.batches import weighted_batch
    from workers.training.loop import run_steps
    from workers.training.ray_train import MLflowMetrics, ProgressBar, checkpoint_and_faults, restore

    tc = HFMoETrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    par = HFExpertParallel(tc)
    lm = build(tc)
    restored = restore(lm, rank, world, par, config.get("resume_uri"))
    opt = par.optimizer(lm)
    if restored.opt_state is not None:
        opt.load_state_dict(restored.opt_state)
    tracker = MaxVioTracker(history=restored.maxvio_history)
    hooks = [lambda r: tracker.add_step(r.loads)]
    sink = None
    if rank == 0:
        hooks.append(ProgressBar(tc, restored.step))
        if config.get("run_id"):
            from mlflow.tracking import MlflowClient

            sink = MLflowMetrics(MlflowClient(config["tracking_uri"]), config["run_id"], tc, lm, world)
            if restored.step:
                sink.log(restored.step, {"resumed_from_step": restored.step})
            hooks.append(sink)
    hooks += checkpoint_and_faults(config, tc, lm, opt, par, tracker, rank, world)
    tokens = config["train_tokens"]
    run_steps(
        lm,
        opt,
        tc.schedule,
        lambda step: weighted_batch(tc, step, rank, tokens, b""),
        start=restored.step,
        groups=par.groups,
        hooks=hooks,
    )
    if sink is not None and tracker.history:
        sink.log(tc.steps, tracker.summary())
