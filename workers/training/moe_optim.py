"""The optimizer side of expert-parallel training: gradient reduction, clipping, AdamW, ZeRO.

Dense parameters: torch AdamW on gradients averaged over all ranks (zero_stage 0), or a
DeepSpeed ZeRO stage 1/2 engine around the same torch AdamW (no JIT-compiled CPU optimizer).
Expert parameters (sharded by expert parallelism): torch AdamW on gradients reduced over the
replicas of the same expert only (`expert_parallel.sync_gradients`), never handed to ZeRO.

Clipping: zero_stage 0 clips by the exact global norm (expert squares summed over the
expert-parallel group); with ZeRO, DeepSpeed clips the dense gradients by their norm and the
experts are clipped by theirs, with the same threshold.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from workers.model.moe.expert_parallel import EPGroups, is_expert_param, sync_gradients
from workers.training.optim import BETAS, param_groups


def _deepspeed_engine(model: nn.Module, optimizer, groups: EPGroups, *, stage: int, micro_batch: int, grad_clip: float):
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU communicator would JIT-compile a shared-memory op at start-up; gloo suffices
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")
    if groups.ep_size > 1:
        from deepspeed.utils import groups as ds_groups

        # DeepSpeed lays out its expert groups as we do (rank = dp_index * ep + ep_rank); it only
        # uses them to broadcast the (already identical) replicas of each expert at start-up
        name = f"ep_size_{groups.ep_size}"
        if name not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(groups.ep_size)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
    }
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, zero_opt


class MoEOptimizer:
    """One object for forward / backward / step over dense and expert parameters (an ``Optimizer``)."""

    def __init__(
        self,
        model: nn.Module,
        groups: EPGroups,
        *,
        lr: float,
        betas: tuple[float, float] = BETAS,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        zero_stage: int = 0,
        grad_clip: float = 1.0,
        micro_batch: int = 1,
    ) -> None:
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage={zero_stage!r}: one of 0, 1, 2")
        self.model, self.groups, self.zero_stage, self.grad_clip = model, groups, zero_stage, grad_clip
        self.dense = [p for p in model.parameters() if not is_expert_param(p)]
        self.experts = [p for p in model.parameters() if is_expert_param(p)]
        kw = {"lr": lr, "betas": betas, "eps": eps}
        self.engine = None
        if zero_stage == 0:
            self.dense_opt = torch.optim.AdamW(param_groups(self.dense, weight_decay), **kw)
        else:
            base = torch.optim.AdamW(param_groups(self.dense, weight_decay), **kw)
            self.engine, self.dense_opt = _deepspeed_engine(
                model, base, groups, stage=zero_stage, micro_batch=micro_batch, grad_clip=grad_clip
            )
        self.expert_opt = torch.optim.AdamW(param_groups(self.experts, weight_decay), **kw) if self.experts else None

    @property
    def optimizers(self) -> list:
        return [o for o in (self.dense_opt, self.expert_opt) if o is not None]

    def __call__(self, *args, **kwargs):
        return (self.engine or self.model)(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)  # ZeRO reduces (and partitions) the dense gradients here
        else:
            loss.backward()

    def _expert_norm_sq(self) -> torch.Tensor:
        zero = torch.zeros((), device=self.experts[0].device if self.experts else "cpu")
        sq = sum((p.grad.float().pow(2).sum() for p in self.experts if p.grad is not None), zero)
        if self.groups.ep_group is not None:
            dist.all_reduce(sq, group=self.groups.ep_group)  # the group holds all experts once
        return sq

    def step(self, lr: float) -> float:
        """Reduce, clip, update; returns the gradient norm before clipping."""
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
        if self.engine is None:
            sync_gradients(list(self.model.parameters()), self.groups)
            dense_sq = sum(float(p.grad.float().pow(2).sum()) for p in self.dense if p.grad is not None)
            norm = math.sqrt(dense_sq + float(self._expert_norm_sq()))
            scale = self.grad_clip / (norm + 1e-6)
            if scale < 1:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.dense_opt.step()
        else:
            sync_gradients(self.experts, self.groups)
            norm = math.sqrt(float(self._expert_norm_sq()))
            if norm > self.grad_clip:
                for p in self.experts:
                    if p.grad is not None:
                        p.grad.mul_(self.grad_clip / (norm + 1e-6))
            self.engine.step()  # dense AdamW on this rank's ZeRO partition, then all-gather
            norm = math.sqrt(norm**2 + float(self.engine.get_global_grad_norm() or 0.0) ** 2)
        if self.expert_opt is not None:
            self.expert_opt.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        for opt in (self.expert_opt, None if self.engine is not None else self.dense_opt):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """This rank's optimizer state (ZeRO keeps only its partition)."""
        return {
            "dense": self.dense_opt.state_dict(),
            "expert": self.expert_opt.state_dict() if self.expert_opt is not None else None,
            "zero_stage": self.zero_stage,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("zero_stage") != self.zero_stage:
            raise ValueError(f"optimizer state is for zero_stage={state.get('zero_stage')}, not {self.zero_stage}")
        if self.engine is not None:
            # DeepSpeed picks entry [dp_rank] of a per-rank list; this rank's own partition is enough
            self.dense_opt.load_state_dict([state["dense"]] * self.groups.world_size, load_from_fp32_weights=True)
        else:
            self.dense_opt.load_state_dict(state["dense"])
        if self.expert_opt is not None and state.get("expert") is not None:
            self.expert_opt.load_state_dict(state["expert"])
