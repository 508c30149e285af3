"""Model-level expert-parallel helpers: shard a CalibLM's experts, gather the full state,
close an optimizer step for every router.

A sharded model holds E / ep_size experts per MoE layer; its checkpoints are always written
in the full (unsharded) layout, so a run can resume on any expert-parallel size and every
other pipeline loads it as a plain CalibLM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from workers.model.moe.expert_parallel import EPGroups
from workers.model.moe.ffn import MoEFFN
from workers.model.moe.router import Router


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFFN]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]


def routers(model: nn.Module) -> list[Router]:
    """Every router of the model, in module order (CalibLM's MoEFFN routers, or the routers
    installed into a transformers MoE model by workers.model.hf.moe)."""
    return [m for m in model.modules() if isinstance(m, Router)]


def shard_model(model: nn.Module, groups: EPGroups) -> nn.Module:
    """Keep only this rank's experts in every MoE layer (no-op for ep_size 1, bar the tags)."""
    for _, layer in moe_layers(model):
        if groups.ep_size > 1:
            layer.shard_experts(groups)
        else:
            layer.ep = groups
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict in the unsharded layout (collective over each expert-parallel group)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, layer in moe_layers(model):
        for w, full in layer.full_expert_state().items():
            state[f"{name}.{w}"] = full.clone()
    return state


def balancing_step(model: nn.Module, groups: EPGroups | None = None) -> list[torch.Tensor]:
    """After an optimizer step: every router closes its step (loss-free bias update).

    Returns the per-layer loads [E] of the step, summed over the expert-parallel group (the
    batch that was dispatched), for MaxVio.
    """
    metric = groups.ep_group if groups is not None else None
    world = dist.group.WORLD if dist.is_initialized() and groups is not None and groups.world_size > 1 else None
    if groups is not None and groups.ep_size == 1:
        metric = None
    return [r.end_step(metric, world) for r in routers(model)]


def take_router_time(model: nn.Module) -> float:
    """Seconds all routers spent selecting experts since the last call (then reset)."""
    total = 0.0
    for r in routers(model):
        total += r.router_time
        r.router_time = 0.0
    return total
