"""The per-worker function Ray Train's TorchTrainer runs (gloo on CPU, NCCL on GPU), any layout.

Every rank builds the same model from the seed, restores the newest checkpoint there is, lays
the model out (``parallel.layout``: data or expert parallel) and runs ``loop.run_steps`` with
these hooks: MaxVio tracking, rank 0's progress bar and MLflow metrics (rank 0 is the only
MLflow writer inside a fit), a checkpoint every ``ckpt_every`` steps (``train_state`` layout)
reported to Ray Train, and the fault injection the tests use.

Where a run starts: Ray Train's own restore (``ray.train.get_checkpoint()``: the newest
checkpoint its controller registered, in this fit or in an earlier fit of the same
``RunConfig(name, storage_path)``), or a newer complete checkpoint the driver found in that
storage (``resume_uri``: written after the driver, and with it the controller, died). A worker
that dies is replaced (FailureConfig) and every rank resumes from the last checkpoint: each
checkpoint is waited for until the controller has registered it, since a report the controller
had not yet polled (every 2 s) died with its worker and the run restarted from step 0. Metric
steps already in the MLflow run are not logged again.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
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
        # a worker replaced mid-run re-runs the steps after its last checkpoint: logged once, before it died
        self.logged_through = max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def __call__(self, r: StepResult) -> None:
        self.tokens += r.x.numel() * self.world
        self.router_s += r.router_s
        if (r.step % self.tc.log_every and r.step != self.tc.steps) or r.step <= self.logged_through:
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
    """One line on the driver's console that updates in place: Ray's tqdm, since plain tqdm inside
    a Ray worker prints a new line per redraw. The loss and attention phase ride in the description
    (Ray's tqdm has no postfix); its state reaches the driver at most every 2 s."""

    def __init__(self, tc: TrainConfig, start: int) -> None:
        from ray.experimental.tqdm_ray import tqdm

        self.bar = tqdm(total=tc.steps, desc="train", unit="step", flush_interval_s=2.0)
        self.bar.n = start

    def __call__(self, r: StepResult) -> None:
        self.bar.set_description(f"train (loss {r.ce.item():.3f}, {r.attn} attention)")
        self.bar.update(1)
        if r.step == self.bar.total:
            self.bar.close()


@dataclass
class Checkpointer:
    """Every ``ckpt_every`` steps and at the last: this rank's share of a checkpoint, reported to Ray
    Train and waited for until the controller registered it (so a worker killed later resumes from it)."""

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
        writers = [0] if self.par.replicated else list(range(self.world))
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if writes:
                train_state.write(
                    Path(d),
                    self.rank,
                    model_state=full if self.rank == 0 else None,
                    opt_state=self.opt.state_dict(),
                    meta=train_state.meta(self.tc, r.step, self.world, self.tracker.history, writers),
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            metrics = {"step": r.step, "train_loss": float(r.ce.detach()), **self.tracker.summary()}
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=train_state.dir_name(r.step))
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


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


def restore(model: torch.nn.Module, rank: int, world: int, par, resume_uri: str | None) -> train_state.Restored:
    """Load the newest of Ray Train's restored checkpoint and the driver's ``resume_uri`` into the model."""
    import ray.train

    sources = [c for c in (ray.train.get_checkpoint(), resume_uri and ray.train.Checkpoint(resume_uri)) if c]
    if not sources:
        return train_state.Restored()
    with max(sources, key=train_state.step_of).as_directory() as d:
        return train_state.read(Path(d), model, rank, world, replicated=par.replicated)


def checkpoint_and_faults(config: dict, tc, model, opt, par, tracker, rank: int, world: int) -> list:
    """The last hooks of every training loop: the Checkpointer, and the fault injection ``config`` asks for
    ("crash_at_step" with "crash_marker", "crash_delay_s")."""
    hooks = [Checkpointer(tc, model, opt, par, tracker, rank, world)]
    if config.get("crash_at_step") is not None and rank == world - 1:
        delay = float(config.get("crash_delay_s", CrashAt.delay_s))
        hooks.append(CrashAt(config["crash_at_step"], Path(config["crash_marker"]), delay))
    return hooks


def fit(
    loop: Callable[[dict], None],
    tc,
    run_id: str,
    loop_config: dict,
    *,
    resume: train_state.Resume | None,
    storage_given: str | None,
) -> Path:
    """The driver's half: run (or, same Ray Train name and storage, restore) a fit of ``loop`` (this
    module's ``train_loop`` or ``hf_moe.train_loop``) for the active MLflow run ``run_id``; returns the
    final checkpoint as a local directory. tc: a TrainConfig or HFMoETrainConfig (their ``steps``,
    ``num_workers``, ``cpus_per_worker``, ``max_failures``). A resume whose newest checkpoint is the
    last step trains nothing: only the evaluation and the logging died with the driver."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.runtime import tracking
    from workers.runtime.cluster import init_ray

    name, where = train_state.ray_run(run_id, resume, storage_given)
    if resume is not None and resume.step >= tc.steps:
        return train_state.local_dir(ray.train.Checkpoint(resume.uri))
    init_ray()
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "train": tc.to_dict(),
            "run_id": run_id,
            "tracking_uri": tracking.tracking_uri(),
            "resume_uri": resume.uri if resume else None,
            **loop_config,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=where,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return train_state.local_dir(result.checkpoint)


def train_loop(config: dict) -> None:
    """config: {"train": TrainConfig dict, "train_tokens", "filler", "run_id", "tracking_uri", "resume_uri",
    and for fault-injection tests "crash_at_step", "crash_marker", "crash_delay_s"}."""
    import ray.train

    tc = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    par = layout(tc, world)
    model = CalibLM(tc.model)
    restored = restore(model, rank, world, par, config.get("resume_uri"))
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
            if restored.step:
                sink.log(restored.step, {"resumed_from_step": restored.step})
            hooks.append(sink)
    hooks += checkpoint_and_faults(config, tc, model, opt, par, tracker, rank, world)
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
