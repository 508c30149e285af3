"""Mixture-of-experts SwiGLU FFN on the shared MoE dispatch kernels, with expert parallelism.

Shape legend: N tokens, D width, F expert hidden, E experts, El local experts, K experts per
token.

Forward: route; sort the N*K slots by expert (permute); run the experts, either all of them
here or, after `shard_experts`, the El local ones with the slots of the whole expert-parallel
group arriving by all-to-all; combine with the gate weights (unpermute). Dropless by default;
with `capacity_factor` c every expert takes at most ceil(c * K * N / E) slots of this rank's
tokens (earlier tokens first) and a dropped slot contributes nothing (the residual carries
the token).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from kernels.moe_dispatch import grouped_swiglu, permute, unpermute
from workers.model.config import MoEConfig
from workers.model.layers import SwiGLU
from workers.model.moe.expert_parallel import EPGroups, ep_expert_pass, mark_expert_param
from workers.model.moe.router import Router, Routing

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def capacity_mask(expert_idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which slots fit: expert_idx [N, K] -> keep [N, K] bool, at most `capacity` per expert,
    filled in token order (slot n*K + j before (n+1)*K + j')."""
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(flat)
    rank_in_expert[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return (rank_in_expert < capacity).view_as(expert_idx)


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, F = cfg.n_experts, d_model, cfg.expert_hidden
        self.router = Router(d_model, cfg)
        self.w_gate = nn.Parameter(torch.randn(E, D, F) * D**-0.5)
        self.w_up = nn.Parameter(torch.randn(E, D, F) * D**-0.5)
        self.w_down = nn.Parameter(torch.randn(E, F, D) * F**-0.5)
        self.shared = SwiGLU(D, F) if cfg.shared_expert else None
        self.ep: EPGroups | None = None
        self.last_routing: Routing | None = None
        self.last_dropped = 0  # slots dropped by the capacity cap in the last forward
        self.last_local_load: torch.Tensor | None = None  # [El] rows the local experts ran

    @property
    def ep_size(self) -> int:
        return self.ep.ep_size if self.ep is not None else 1

    def shard_experts(self, groups: EPGroups) -> None:
        """Keep only this rank's E / ep_size experts (contiguous block ep_rank) and tag them."""
        E, ep = self.cfg.n_experts, groups.ep_size
        if E % ep:
            raise ValueError(f"n_experts={E} must be divisible by ep_size={ep}")
        el, lo = E // ep, groups.ep_rank * (E // ep)
        for name in EXPERT_WEIGHTS:
            full = getattr(self, name)
            if full.shape[0] != E:
                raise ValueError(f"{name} is already sharded ({full.shape[0]} of {E} experts)")
            setattr(self, name, mark_expert_param(nn.Parameter(full.detach()[lo : lo + el].clone()), ep))
        self.ep = groups
        self.router.ep_group = groups.ep_group

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (y [B, T, D], aux loss scalar)."""
        B, T, D = x.shape
        E = self.cfg.n_experts
        flat = x.reshape(B * T, D)
        r = self.router(flat)
        self.last_routing = r
        idx, gates = r.expert_idx, r.gates.to(x.dtype)
        n_kept = idx.numel()
        if self.cfg.capacity_factor is not None:
            cap = math.ceil(self.cfg.capacity_factor * idx.numel() / E)
            keep = capacity_mask(idx, E, cap)
            # dropped slots go to a sentinel expert E, which sorts last and is never run
            idx = torch.where(keep, idx, torch.full_like(idx, E))
            n_kept = int(keep.sum())
        xs, order, counts = permute(flat, idx, E + (n_kept < idx.numel()))  # [N*K, D]
        counts = counts[:E]
        if self.ep_size > 1:
            ys, self.last_local_load = ep_expert_pass(xs[:n_kept], counts, self.w_gate, self.w_up, self.w_down, self.ep)
        else:
            ys = grouped_swiglu(xs[:n_kept], counts, self.w_gate, self.w_up, self.w_down)  # [n_kept, D]
            self.last_local_load = counts
        if n_kept < idx.numel():
            ys = torch.cat([ys, ys.new_zeros(idx.numel() - n_kept, D)])
        self.last_dropped = idx.numel() - n_kept
        y = unpermute(ys, order, gates)  # [N, D]
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, D), r.aux_loss

    def full_expert_state(self) -> dict[str, torch.Tensor]:
        """All E experts' weights, gathered over the expert-parallel group (every rank gets them)."""
        if self.ep_size == 1:
            return {name: getattr(self, name).detach() for name in EXPERT_WEIGHTS}
        out = {}
        for name in EXPERT_WEIGHTS:
            local = getattr(self, name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(parts, local, group=self.ep.ep_group)
            out[name] = torch.cat(parts)
        return out
