"""Ray Train worker loop for expert-parallel MoE training (and DeepSpeed ZeRO 1/2).

Used by `pipelines.train_moe` when `ep_size > 1` or `zero_stage > 0`. Every worker builds the
same model from the seed, keeps its E / ep_size experts (`shard_model`), and trains with
`MoEOptimizer` (dense gradients over all ranks or ZeRO, expert gradients over the replicas
of each expert). After every optimizer step the routers close their step (loss-free bias,
loads summed over the expert-parallel group); rank 0 is the only MLflow writer.

Checkpoints (every `ckpt_every` steps, reported by every rank into one directory): rank 0
writes the unsharded model (`train_state.pt`, the layout `pipelines.train_moe` evaluates and
resumes from) and every rank its own optimizer state (`optim_rank<r>.pt`). A killed worker is
replaced by Ray Train (FailureConfig) and all ranks resume from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from workers.model.moe.balancing import max_vio
from workers.model.moe.distributed import balancing_step, full_state_dict, moe_layers, shard_model, take_router_time
from workers.model.moe.expert_parallel import init_ep_groups
from workers.model.moe.metrics import MaxVioTracker, straggler_ratio
from workers.model.transformer import CalibLM, lm_loss
from workers.training.batches import train_batch
from workers.training.config import TrainConfig
from workers.training.loop import META_FILE, STATE_FILE, lr_at
from workers.training.moe_optim import MoEOptimizer


def needs_moe_loop(tc: TrainConfig) -> bool:
    """Expert parallelism or ZeRO: this loop; otherwise the plain data-parallel loop."""
    return tc.model.moe is not None and (tc.ep_size > 1 or tc.zero_stage > 0)


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def read_checkpoint(directory: Path, model: CalibLM, rank: int, world: int) -> tuple[int, dict | None, list]:
    """Load the unsharded weights into the (not yet sharded) model; return (step, this rank's
    optimizer state or None when the world size changed, MaxVio history)."""
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    meta = json.loads((directory / META_FILE).read_text())
    opt_state = None
    if meta.get("world_size") == world and (directory / optim_file(rank)).exists():
        opt_state = torch.load(directory / optim_file(rank), map_location="cpu", weights_only=False)
    return int(state["step"]), opt_state, meta.get("maxvio_history", [])


def step_metrics(model, loads: list[torch.Tensor], ep_size: int) -> dict[str, float]:
    """Per layer: MaxVio, load per expert, straggler ratio (max / mean rank load)."""
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


def moe_train_loop(config: dict) -> None:
    import ray.train

    tc = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    groups = init_ep_groups(tc.ep_size)
    model = CalibLM(tc.model)
    start, opt_state, history = 0, None, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start, opt_state, history = read_checkpoint(Path(d), model, rank, world)
    elif config.get("resume_dir"):
        start, opt_state, history = read_checkpoint(Path(config["resume_dir"]), model, rank, world)
    shard_model(model, groups)
    opt = MoEOptimizer(
        model,
        groups,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        zero_stage=tc.zero_stage,
        grad_clip=tc.grad_clip,
        micro_batch=tc.batch_size,
    )
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    tokens, filler = config["train_tokens"], config["filler"]
    tracker = MaxVioTracker(history=[list(r) for r in history])

    client = None
    if rank == 0 and config.get("run_id"):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["tracking_uri"])
        if ckpt is not None or config.get("resume_dir"):
            client.log_metric(config["run_id"], "resumed_from_step", start, step=start)
    t_last, tok_since = time.perf_counter(), 0
    model.train()
    take_router_time(model)
    for step in range(start, tc.steps):
        x = train_batch(tc, step, rank, tokens, filler)
        attn = "dense" if (not tc.uses_indexer or step < tc.dense_warmup_steps) else "sparse"
        out = opt(x, attn=attn, indexer_loss=tc.uses_indexer)
        ce = lm_loss(out.logits, x)
        opt.backward(ce + out.aux_loss + tc.indexer_loss_weight * out.indexer_kl)
        gnorm = opt.step(lr_at(tc, step))
        loads = balancing_step(model, groups)  # collective: every rank, every step
        tracker.add_step(loads)
        tok_since += x.numel() * world
        if client is not None and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
            now = time.perf_counter()
            m = {
                "train_loss": float(ce.detach()),
                "aux_loss": float(out.aux_loss.detach()),
                "indexer_kl": float(out.indexer_kl.detach()),
                "lr": lr_at(tc, step),
                "grad_norm": gnorm,
                "tokens_per_s": tok_since / (now - t_last),
                "router_ms": 1e3 * take_router_time(model) / tc.log_every,
                **step_metrics(model, loads, tc.ep_size),
            }
            t_last, tok_since = now, 0
            ts = int(time.time() * 1000)
            client.log_batch(config["run_id"], metrics=[Metric(k, float(v), ts, step + 1) for k, v in m.items()])
        if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
            full = full_state_dict(model)  # collective over each expert-parallel group
            with tempfile.TemporaryDirectory() as d:
                torch.save(opt.state_dict(), Path(d) / optim_file(rank))
                if rank == 0:
                    torch.save({"model": full, "opt": None, "step": step + 1}, Path(d) / STATE_FILE)
                    meta = {
                        "step": step + 1,
                        "world_size": world,
                        "config": tc.to_dict(),
                        "maxvio_history": tracker.history,
                    }
                    (Path(d) / META_FILE).write_text(json.dumps(meta))
                metrics = {"step": step + 1, "train_loss": float(ce.detach()), **tracker.summary()}
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if config.get("crash_at_step") == step + 1 and rank == world - 1:
            # fault injection for tests: the process dies outright (as a killed worker would), once
            marker = Path(config["crash_marker"])
            if not marker.exists():
                marker.write_text(f"worker {rank} killed at step {step + 1}")
                # stay alive a moment, as a worker killed mid-run would have: Ray Train's
                # controller registers the last reported checkpoint when it next polls
                time.sleep(float(config.get("crash_delay_s", 5.0)))
                os._exit(1)
    if client is not None:
        client.log_batch(
            config["run_id"],
            metrics=[Metric(k, v, int(time.time() * 1000), tc.steps) for k, v in tracker.summary().items()],
        )
