"""Load-balance metrics: per-step per-layer MaxVio and the per-run summaries of moe_bip.md.

MaxVio (per batch, per layer) = (max_j load_j - mean load) / mean load, with load_j the
tokens routed to expert j after selection and before any dropping. A run reports:
  avg_maxvio     mean over steps and layers        sup_maxvio    max over steps and layers
  maxvio_step1   mean over layers at step 1         maxvio_1_20   mean over steps 1-20 and layers
  maxvio_last20  mean over the last 20% of steps (at least one) and layers
The straggler proxy of expert parallelism is max rank load / mean rank load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.model.moe.balancing import max_vio


def rank_loads(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Tokens each expert-parallel rank must process: load [E] -> [ep_size] (experts split
    contiguously, E / ep_size per rank)."""
    if load.shape[-1] % ep_size:
        raise ValueError(f"{load.shape[-1]} experts do not split over ep_size={ep_size}")
    return load.float().reshape(*load.shape[:-1], ep_size, -1).sum(-1)


def straggler_ratio(load: torch.Tensor, ep_size: int) -> float:
    """Max rank load / mean rank load for load [E] on ep_size ranks (1.0 = perfectly even)."""
    per_rank = rank_loads(load, ep_size)
    return float(per_rank.max() / per_rank.mean().clamp_min(1e-12))


@dataclass
class MaxVioTracker:
    """Collects one MaxVio value per (step, layer) and summarises them for a run."""

    history: list[list[float]] = field(default_factory=list)  # [steps][layers]

    def add_step(self, loads: list[torch.Tensor]) -> list[float]:
        """Record one optimizer step given each layer's load [E]; returns the layer MaxVios."""
        values = [float(max_vio(load)) for load in loads]
        self.history.append(values)
        return values

    def summary(self) -> dict[str, float]:
        if not self.history:
            return {}
        table = torch.tensor(self.history, dtype=torch.float64)  # [S, L]
        return {
            "avg_maxvio": float(table.mean()),
            "sup_maxvio": float(table.max()),
            "maxvio_step1": float(table[0].mean()),
            "maxvio_1_20": float(table[:20].mean()),
            "maxvio_last20": float(table[-max(1, round(0.2 * len(table))) :].mean()),
        }

    def state_dict(self) -> dict:
        return {"history": [list(row) for row in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [list(row) for row in state.get("history", [])]
