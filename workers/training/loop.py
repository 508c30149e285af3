"""The training loop: every caller (Ray Train data or expert parallel, one process, the balancing
sweep's arms) runs its steps through ``run_steps``.

What differs between callers is passed in: the optimizer (``AdamWOptimizer`` or ``MoEOptimizer``),
the schedule and objective (data), the batch source, the expert-parallel groups the routers
reduce their loads over, and the hooks that see each finished step (metrics, checkpoints, fault
injection).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.model.moe.distributed import balancing_step, take_router_time
from workers.model.moe.expert_parallel import EPGroups
from workers.model.transformer import CalibLM, LMOutput, lm_loss
from workers.training.batches import weighted_batch
from workers.training.config import TrainConfig
from workers.training.optim import AdamWOptimizer, Optimizer
from workers.training.schedule import LRSchedule, Objective

Batch = tuple[torch.Tensor, torch.Tensor | None]  # tokens [B, L], loss weights [B, L-1] or None (uniform)
PLAIN_LM = Objective()  # no indexer: dense attention, LM + router aux loss


@dataclass(frozen=True)
class StepResult:
    """One finished optimizer step, as the hooks see it."""

    step: int  # optimizer steps done, 1-based
    x: torch.Tensor  # the batch [B, L]
    out: LMOutput  # logits [B, L, V], aux_loss, indexer_kl
    ce: torch.Tensor  # LM loss, scalar
    lr: float
    attn: str
    grad_norm: float  # before clipping
    loads: list[torch.Tensor]  # per MoE layer [E]: tokens routed this step, summed over the EP group
    seconds: float  # wall time of the step, batch excluded
    router_s: float  # of which the routers spent selecting experts


StepHook = Callable[[StepResult], None]


def run_steps(
    model: nn.Module,
    opt: Optimizer,
    schedule: LRSchedule,
    batch_at: Callable[[int], Batch],
    *,
    objective: Objective = PLAIN_LM,
    start: int = 0,
    groups: EPGroups | None = None,
    hooks: Sequence[StepHook] = (),
) -> None:
    """Steps ``start`` .. ``schedule.steps - 1`` on ``model`` (the core module, sharded or not).

    After every optimizer step the routers close it (the loss-free bias moves once per step;
    loads are summed over ``groups``' expert-parallel group, a collective every rank must reach).
    """
    model.train()
    take_router_time(model)
    for step in range(start, schedule.steps):
        x, w = batch_at(step)
        t0 = time.perf_counter()
        lr, attn = schedule.lr_at(step), objective.attn_at(step)
        out = opt(x, attn=attn, indexer_loss=objective.indexer)
        ce = lm_loss(out.logits, x, w)
        opt.backward(ce + out.aux_loss + objective.indexer_loss_weight * out.indexer_kl)
        grad_norm = opt.step(lr)
        loads = balancing_step(model, groups)
        result = StepResult(
            step=step + 1,
            x=x,
            out=out,
            ce=ce,
            lr=lr,
            attn=attn,
            grad_norm=grad_norm,
            loads=loads,
            seconds=time.perf_counter() - t0,
            router_s=take_router_time(model),
        )
        for hook in hooks:
            hook(result)


def train_local(tc: TrainConfig, tokens: torch.Tensor, filler: bytes) -> tuple[CalibLM, list[float]]:
    """The Ray Train recipe with one worker, in this process (test fixtures, quick experiments)."""
    torch.manual_seed(tc.seed)
    model = CalibLM(tc.model)
    opt = AdamWOptimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    losses: list[float] = []
    run_steps(
        model,
        opt,
        tc.schedule,
        lambda step: weighted_batch(tc, step, 0, tokens, filler),
        objective=tc.objective,
        hooks=[lambda r: losses.append(r.ce.item())],
    )
    return model.eval(), losses
