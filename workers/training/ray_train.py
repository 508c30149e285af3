"""The per-worker function Ray Train's TorchTrainer runs (gloo on CPU, NCCL on GPU), any layout.

Every rank builds the same model from the seed, restores the last checkpoint if there is one,
lays the model out (``parallel.layout``: data or expert parallel) and runs ``loop.run_steps``
with these hooks: MaxVio tracking, rank 0's progress bar and MLflow metrics (rank 0 is the only
MLflow writer inside a fit), a checkpoint every ``ckpt_every`` steps (``train_state`` layout)
reported to Ray Train, and the fault injection the tests use. A worker that dies is replaced
(FailureConfig) and every rank resumes from the last checkpoint; a driver that dies resumes
with ``--resume``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.model.moe.balancing import max_vio
from workers.model.moe.distributed import moe_layers
from workers.model.moe.metrics import MaxVioTracker, straggler_ratio
from workers.model.transformer import CalibLM
from workers.training import train_state
from workers.training.batches import weighted_batch
from workers.training.config import TrainConfig
from workers.training.loop import StepResult, run_steps
from workers.training.optim import Optimizer
from workers.training.parallel import DataParallel, ExpertParallel, layout


def step_metrics(model, loads: list[torch.Tensor], ep_size: int) -> dict[str, float]:
    """Per MoE layer: MaxVio, load per expert, straggler ratio (max / mean rank load); {} for a dense model."""
    m: dict[str, float] = {}
    vios, strag = [], []
    for i, load in enumerate(loads):
        vios.append(float(max_vio(load)))
        m[f"maxvio/layer_{i}"] = vios[-1]
        for j, v in enumerate(load.tolist()):
            m[f"load/layer_{i}/expert_{j}"] = v
        strag.append(straggler_ratio(load, ep_size))
    if vios:
        m["maxvio"] = sum(vios) / len(vios)
        m["straggler_ratio"] = sum(strag) / len(strag)
        m["dropped_slots"] = float(sum(layer.last_dropped for _, layer in moe_layers(model)))
    return m


class MLflowMetrics:
    """Rank 0's metrics every ``log_every`` steps and at the last; tokens/s counts every rank's tokens."""

    def __init__(self, client, run_id: str, tc: TrainConfig, model, world: int) -> None:
        self.client, self.run_id, self.tc, self.model, self.world = client, run_id, tc, model, world
        self.t_last, self.tokens, self.router_s = time.perf_counter(), 0, 0.0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def __call__(self, r: StepResult) -> None:
        self.tokens += r.x.numel() * self.world
        self.router_s += r.router_s
        if r.step % self.tc.log_every and r.step != self.tc.steps:
            return
        now = time.perf_counter()
        m = {
            "train_loss": float(r.ce.detach()),
            "aux_loss": float(r.out.aux_loss.detach()),
            "indexer_kl": float(r.out.indexer_kl.detach()),
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": self.tokens / (now - self.t_last),
        }
        if r.loads:
            m["router_ms"] = 1e3 * self.router_s / self.tc.log_every
            m.update(step_metrics(self.model, r.loads, self.tc.ep_size))
        self.t_last, self.tokens, self.router_s = now, 0, 0.0
        self.log(r.step, m)


class ProgressBar:
    def __init__(self, tc: TrainConfig, start: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", mininterval=2.0)

    def __call__(self, r: StepResult) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{r.ce.item():.3f}", attn=r.attn)
        if r.step == self.bar.total:
            self.bar.close()


@dataclass
class Checkpointer:
    """Every ``ckpt_every`` steps and at the last: this rank's share of a checkpoint, reported to Ray Train."""

    tc: TrainConfig
    model: torch.nn.Module
    opt: Optimizer
    par: DataParallel | ExpertParallel
    tracker: MaxVioTracker
    rank: int
    world: int

    def __call__(self, r: StepResult) -> None:
        import ray.train

        if r.step % self.tc.ckpt_every and r.step != self.tc.steps:
            return
        full = self.par.full_state(self.model)  # a collective for expert parallelism: every rank
        writes = self.rank == 0 or not self.par.replicated
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if writes:
                train_state.write(
                    Path(d),
                    self.rank,
                    model_state=full if self.rank == 0 else None,
                    opt_state=self.opt.state_dict(),
                    meta=train_state.meta(self.tc, r.step, self.world, self.tracker.history),
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            metrics = {"step": r.step, "train_loss": float(r.ce.detach()), **self.tracker.summary()}
            ray.train.report(metrics, checkpoint=checkpoint)


@dataclass(frozen=True)
class CrashAt:
    """Fault injection for tests: the last rank dies outright after ``step`` (as a killed worker would), once."""

    step: int
    marker: Path
    delay_s: float = 5.0  # alive a moment, as a worker killed mid-run: the controller registers the last checkpoint

    def __call__(self, r: StepResult) -> None:
        if r.step == self.step and not self.marker.exists():
            self.marker.write_text(f"killed at step {r.step}")
            time.sleep(self.delay_s)
            os._exit(1)


def train_loop(config: dict) -> None:
    """config: {"train": TrainConfig dict, "train_tokens", "filler", "run_id", "tracking_uri", "resume_dir",
    and for fault-injection tests "crash_at_step", "crash_marker", "crash_delay_s"}."""
    import ray.train

    tc = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    par = layout(tc, world)
    model = CalibLM(tc.model)
    restored = train_state.Restored()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = train_state.read(Path(d), model, rank, world, replicated=par.replicated)
    elif config.get("resume_dir"):
        restored = train_state.read(Path(config["resume_dir"]), model, rank, world, replicated=par.replicated)
    opt = par.optimizer(model)
    if restored.opt_state is not None:
        opt.load_state_dict(restored.opt_state)
    tracker = MaxVioTracker(history=restored.maxvio_history)
    hooks = [lambda r: r.loads and tracker.add_step(r.loads)]  # a dense model has no loads
    sink = None
    if rank == 0:
        hooks.append(ProgressBar(tc, restored.step))
        if config.get("run_id"):
            from mlflow.tracking import MlflowClient

            sink = MLflowMetrics(MlflowClient(config["tracking_uri"]), config["run_id"], tc, model, world)
            if ckpt is not None or config.get("resume_dir"):
                sink.log(restored.step, {"resumed_from_step": restored.step})
            hooks.append(sink)
    hooks.append(Checkpointer(tc, model, opt, par, tracker, rank, world))
    if config.get("crash_at_step") is not None and rank == world - 1:
        delay = float(config.get("crash_delay_s", CrashAt.delay_s))
        hooks.append(CrashAt(config["crash_at_step"], Path(config["crash_marker"]), delay))
    tokens, filler = config["train_tokens"], config["filler"]
    run_steps(
        model,
        opt,
        tc.schedule,
        lambda step: weighted_batch(tc, step, rank, tokens, filler),
        objective=tc.objective,
        start=restored.step,
        groups=par.groups,
        hooks=hooks,
    )
    if sink is not None and tracker.history:
        sink.log(tc.steps, tracker.summary())
