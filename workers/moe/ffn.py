"""Mixture-of-experts SwiGLU FFN on the shared MoE dispatch kernels.

Shape legend: N tokens, D width, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.moe_dispatch import grouped_swiglu, permute, unpermute
from workers.model.config import MoEConfig
from workers.model.layers import SwiGLU

from .router import Router, Routing


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
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (y [B, T, D], aux loss scalar)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        r = self.router(flat)
        self.last_routing = r
        xs, order, counts = permute(flat, r.expert_idx, self.cfg.n_experts)  # [N*K, D]
        ys = grouped_swiglu(xs, counts, self.w_gate, self.w_up, self.w_down)  # [N*K, D]
        y = unpermute(ys, order, r.gates.to(x.dtype))  # [N, D]
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, D), r.aux_loss
