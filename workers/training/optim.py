"""The optimizer side of a training step for a replicated model: AdamW, clipping, one interface.

``Optimizer`` is what the training loop drives: forward (through the wrapper that reduces
gradients, if any), backward, and a step that sets the learning rate, clips and updates. Two
implementations: ``AdamWOptimizer`` here (one process, or DDP averaging gradients in backward)
and ``MoEOptimizer`` (workers/training/moe_optim.py: expert parallelism, ZeRO).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from workers.model.transformer import LMOutput

BETAS = (0.9, 0.95)


class Optimizer(Protocol):
    def __call__(self, tokens: torch.Tensor, **kwargs) -> LMOutput: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> float:
        """Reduce, clip, update at learning rate lr, clear the gradients; returns the norm before clipping."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def param_groups(params: list[nn.Parameter], weight_decay: float, decay_norms: bool = False) -> list[dict]:
    """AdamW groups: no weight decay on 1-D tensors (norm gains, biases) unless ``decay_norms``."""
    if decay_norms:
        return [{"params": list(params), "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]


class AdamWOptimizer:
    """torch AdamW (no JIT-compiled CPU optimizer) on every parameter, clipped by the global norm.

    ``module`` is what the forward runs through: the model itself, or its DistributedDataParallel
    wrapper, whose backward averages the gradients over the ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        grad_clip: float,
        decay_norms: bool = False,
        module: nn.Module | None = None,
    ) -> None:
        self.module = module if module is not None else model
        self.params = list(model.parameters())
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(param_groups(self.params, weight_decay, decay_norms), lr=lr, betas=BETAS)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> LMOutput:
        return self.module(tokens, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
