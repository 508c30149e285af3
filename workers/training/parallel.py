"""How a model is laid out over the Ray Train ranks: the optimizer, the state a checkpoint gathers.

``DataParallel``: every rank holds the whole model; with more than one rank, DDP averages the
gradients in backward; torch AdamW, clipped by torch's global norm. ``ExpertParallel``: each rank
keeps E / ep_size experts of every MoE layer (``shard_model``) and trains with ``MoEOptimizer``
(dense gradients over all ranks or ZeRO 1/2, expert gradients over the replicas of each expert).
"""

from __future__ import annotations

from torch import nn

from workers.model.moe.distributed import full_state_dict, shard_model
from workers.model.moe.expert_parallel import EPGroups, init_ep_groups
from workers.training.config import TrainConfig
from workers.training.moe_optim import MoEOptimizer
from workers.training.optim import AdamWOptimizer, Optimizer


class DataParallel:
    replicated = True  # every rank holds the same optimizer state

    def __init__(self, tc: TrainConfig, world: int) -> None:
        self.tc, self.world = tc, world
        # routers close their step with this: MaxVio from this rank's loads, the loss-free bias
        # from the loads of all ranks (as in expert parallelism), so every replica moves it
        # alike; with this rank's loads only, DDP's buffer broadcast kept rank 0's bias and
        # rank 1's tokens never moved it
        self.groups: EPGroups | None = None
        if world > 1:
            import torch.distributed as dist

            self.groups = EPGroups(1, world, dist.get_rank(), 0, None, None)

    def optimizer(self, model: nn.Module) -> Optimizer:
        module = None
        if self.world > 1:
            import ray.train.torch

            module = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        return AdamWOptimizer(
            model, lr=self.tc.lr, weight_decay=self.tc.weight_decay, grad_clip=self.tc.grad_clip, module=module
        )

    def full_state(self, model: nn.Module) -> dict:
        return model.state_dict()


class ExpertParallel:
    replicated = False  # each rank holds its own experts' (and, under ZeRO, its partition's) state

    def __init__(self, tc: TrainConfig, world: int) -> None:
        self.tc, self.world = tc, world
        self.groups = init_ep_groups(tc.ep_size)  # collective: every rank, before the model is built

    def optimizer(self, model: nn.Module) -> Optimizer:
        shard_model(model, self.groups)
        tc = self.tc
        return MoEOptimizer(
            model,
            self.groups,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            zero_stage=tc.zero_stage,
            grad_clip=tc.grad_clip,
            micro_batch=tc.batch_size,
        )

    def full_state(self, model: nn.Module) -> dict:
        return full_state_dict(model)  # collective over each expert-parallel group


def layout(tc: TrainConfig, world: int) -> DataParallel | ExpertParallel:
    return ExpertParallel(tc, world) if tc.expert_parallel else DataParallel(tc, world)
