"""The per-worker training loop run by Ray Train's TorchTrainer (gloo on CPU, NCCL on GPU).

Rank 0 is the only MLflow writer inside a fit. Checkpoints (model, optimizer, step) are
reported to Ray Train every ``ckpt_every`` steps, so a worker that dies is replaced and the
group restarts from the last one; a driver that dies resumes with ``--resume``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from workers.model.transformer import CalibLM, lm_loss
from workers.training.batches import weighted_batch
from workers.training.config import TrainConfig

STATE_FILE = "train_state.pt"
META_FILE = "train_meta.json"


def lr_at(tc: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_frac."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def save_state(directory: Path, model: CalibLM, opt, step: int, tc: TrainConfig) -> None:
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps({"step": step, "config": tc.to_dict()}))


def load_state(directory: Path, model: CalibLM, opt) -> int:
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def router_stats(model: CalibLM) -> dict[str, float]:
    """MaxVio per MoE layer for the last forward: (max load - mean load) / mean load."""
    out: dict[str, float] = {}
    for i, blk in enumerate(model.layers):
        r = getattr(blk.ffn, "last_routing", None)
        if r is None:
            continue
        load = r.load.float()
        out[f"maxvio/layer_{i}"] = float((load.max() - load.mean()) / load.mean().clamp_min(1e-9))
    if out:
        out["maxvio"] = sum(out.values()) / len(out)
    return out


def make_optimizer(model: CalibLM, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch's own: no JIT-compiled CPU optimizer), no decay on norms and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


def train_step(model, opt, tc: TrainConfig, x: torch.Tensor, step: int, weights: torch.Tensor | None = None):
    """One optimizer step on batch x [B, L]: LM loss + router aux loss + indexer KL.

    DSA: dense attention for the first ``dense_warmup_steps`` (the indexer learns from the
    dense distribution), sparse afterwards; the indexer's input is detached inside the model.
    """
    for group in opt.param_groups:
        group["lr"] = lr_at(tc, step)
    attn = "dense" if (not tc.uses_indexer or step < tc.dense_warmup_steps) else "sparse"
    out = model(x, attn=attn, indexer_loss=tc.uses_indexer)
    ce = lm_loss(out.logits, x, weights)
    loss = ce + out.aux_loss + tc.indexer_loss_weight * out.indexer_kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    if tc.model.moe is not None:
        from workers.model.moe.distributed import balancing_step

        balancing_step(model)  # routers close the step: the loss-free bias moves once per step
    return out, ce, gnorm, attn


def train_local(tc: TrainConfig, tokens: torch.Tensor, filler: bytes) -> tuple[CalibLM, list[float]]:
    """The same steps in one process without Ray (test fixtures, quick experiments)."""
    torch.manual_seed(tc.seed)
    model = CalibLM(tc.model)
    opt = make_optimizer(model, tc)
    model.train()
    losses = []
    for step in range(tc.steps):
        x, w = weighted_batch(tc, step, 0, tokens, filler)
        _, ce, _, _ = train_step(model, opt, tc, x, step, w)
        losses.append(ce.item())
    return model.eval(), losses


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    tc = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    model = CalibLM(tc.model)
    opt = make_optimizer(model, tc)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = load_state(Path(d), model, opt)
    elif config.get("resume_dir"):
        start = load_state(Path(config["resume_dir"]), model, opt)
    core = model
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    tokens = config["train_tokens"]
    filler = config["filler"]

    client = None
    if rank == 0 and config.get("run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["tracking_uri"])
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", mininterval=2.0)
    t_last, tok_since = time.perf_counter(), 0
    model.train()
    for step in range(start, tc.steps):
        x, w = weighted_batch(tc, step, rank, tokens, filler)
        out, ce, gnorm, attn = train_step(model, opt, tc, x, step, w)
        tok_since += x.numel() * world
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ce.item():.3f}", attn=attn)
        if rank == 0 and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
            now = time.perf_counter()
            m = {
                "train_loss": ce.item(),
                "indexer_kl": float(out.indexer_kl),
                "aux_loss": float(out.aux_loss),
                "lr": lr_at(tc, step),
                "grad_norm": float(gnorm),
                "tokens_per_s": tok_since / (now - t_last),
            }
            m.update(router_stats(core))
            t_last, tok_since = now, 0
            if client is not None:
                from mlflow.entities import Metric

                ts = int(time.time() * 1000)
                client.log_batch(config["run_id"], metrics=[Metric(k, float(v), ts, step + 1) for k, v in m.items()])
        if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_state(Path(d), core, opt, step + 1, tc)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step + 1, "train_loss": ce.item()}, checkpoint=checkpoint)
        if config.get("crash_at_step") == step + 1 and rank == world - 1:
            # Fault-injection for tests: the process dies outright (as a killed worker would), once.
            marker = Path(config["crash_marker"])
            if not marker.exists():
                marker.write_text(f"worker {rank} killed at step {step + 1}")
                os._exit(1)
    if bar is not None:
        bar.close()
