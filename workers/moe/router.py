"""Token -> expert routing. One interface; the balancing strategies plug in here.

Shape legend: N tokens, E experts, K experts per token.
Every strategy changes only WHICH experts are selected; gate weights of the selected
experts always come from the raw scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.model.config import MoEConfig


@dataclass
class Routing:
    expert_idx: torch.Tensor  # [N, K] long
    gates: torch.Tensor  # [N, K] gate weights from raw scores
    aux_loss: torch.Tensor  # scalar (0 unless the strategy adds one)
    load: torch.Tensor  # [E] tokens routed to each expert in this batch (before any dropping)


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d_model, cfg.n_experts, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> scores [N, E] in fp32."""
        logits = self.gate(x).float()
        return logits.softmax(-1) if self.cfg.router.score_fn == "softmax" else logits.sigmoid()

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """Which experts each token takes: [N, E] scores -> [N, K] indices."""
        strategy = self.cfg.router.strategy
        if strategy in ("none", "aux_loss"):
            return s.topk(self.cfg.top_k, dim=-1).indices
        raise NotImplementedError(f"router.strategy={strategy!r} is not implemented yet")

    def forward(self, x: torch.Tensor) -> Routing:
        s = self.scores(x)
        idx = self.select(s.detach())
        gates = torch.gather(s, 1, idx)
        if self.cfg.router.score_fn == "sigmoid":
            gates = gates / gates.sum(-1, keepdim=True)
        load = torch.bincount(idx.flatten(), minlength=self.cfg.n_experts)
        aux = s.new_zeros(())
        if self.cfg.router.strategy == "aux_loss" and self.training:
            n, m = s.shape
            f = load.float() / (n * self.cfg.top_k)
            aux = self.cfg.router.alpha * m * (f * s.mean(0)).sum()
        return Routing(idx, gates, aux, load)
