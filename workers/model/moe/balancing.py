"""The balancing math of the four routing strategies, as pure functions on score tensors.

Shape legend: N tokens in the (expert-parallel) batch, E experts, K experts per token.

Every strategy changes only WHICH experts a token goes to; the gate weights of the selected
experts are always gathered from the raw scores (`gate_weights`), so a strategy can never
alter the contribution of an expert once it is chosen.

- none:      top-K of s.
- aux_loss:  top-K of s, plus alpha * E * sum_j f_j * P_j (f_j: share of routed slots of
             expert j, P_j: mean score of expert j).
- loss_free: top-K of s + b; after each optimizer step b_j += u * sign(mean load - load_j).
- bip:       top-K of s - q, with the price vector q >= 0 from T rounds of block-coordinate
             minimisation of the dual of the LP relaxation of
             max sum s_ij x_ij  s.t.  sum_j x_ij <= K,  sum_i x_ij <= cap,  0 <= x <= 1.
             The prices and the BIP routing live in kernels.bip_select (a fused CPU kernel
             beside the PyTorch reference); they are re-exported here.
"""

from __future__ import annotations

import torch

from kernels.bip_select import bip_prices, bip_route, bip_route_causal, capacity, kth_largest

__all__ = [
    "BIP_MODES",
    "STRATEGIES",
    "aux_loss",
    "bip_prices",
    "bip_route",
    "bip_route_causal",
    "capacity",
    "expert_load",
    "gate_weights",
    "kth_largest",
    "loss_free_update",
    "max_vio",
    "select_topk",
]

STRATEGIES = ("none", "aux_loss", "loss_free", "bip")
BIP_MODES = ("pre", "causal")


def select_topk(scores: torch.Tensor, k: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the K best experts per token under `scores + offset`.

    scores [N, E], offset [E] or None -> idx [N, K] int64 (descending adjusted score; among
    exact ties torch.topk's order, which on CPU is libstdc++'s nth_element's, not the lowest index).
    The offset only ranks experts; it never enters the gate weights.
    """
    ranked = scores if offset is None else scores + offset.to(scores.dtype)
    return ranked.topk(k, dim=-1).indices


def gate_weights(scores: torch.Tensor, idx: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Gate weights of the selected experts, taken from the RAW scores.

    scores [N, E], idx [N, K] -> gates [N, K]. With `normalize` the K weights of a token are
    rescaled to sum to one (the usual choice with sigmoid scores); either way they depend on
    s only, not on any balancing bias or price.
    """
    gates = scores.gather(-1, idx)
    if normalize:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
    return gates


def expert_load(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: idx [N, K] -> load [E] (float, before any dropping)."""
    return torch.bincount(idx.reshape(-1), minlength=n_experts).to(torch.float32)


def aux_loss(
    scores: torch.Tensor, idx: torch.Tensor, alpha: float, slot_fraction: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss-Controlled balancing loss alpha * E * sum_j f_j * P_j.

    scores [N, E] (differentiable), idx [N, K]. f_j = share of the N*K routed slots taken by
    expert j (no gradient; pass `slot_fraction` [E] to use the share over the whole
    expert-parallel group), P_j = mean score of expert j over the N tokens. Equals alpha when
    routing and scores are uniform.
    """
    n_experts = scores.shape[-1]
    if slot_fraction is None:
        slot_fraction = expert_load(idx, n_experts) / max(idx.numel(), 1)
    mean_score = scores.float().mean(0)  # [E]
    return alpha * n_experts * (slot_fraction.to(mean_score) * mean_score).sum()


def loss_free_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """One loss-free bias step: b_j + u * sign(mean load - load_j).

    bias [E], load [E] (tokens per expert counted over one optimizer step and summed over the
    expert-parallel group) -> new bias [E]. Overloaded experts are pushed down, idle ones up.
    """
    return bias + rate * torch.sign(load.float().mean() - load.float()).to(bias.dtype)


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_j load_j - mean load) / mean load; load [..., E] -> [...]."""
    load = load.float()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.clamp_min(1e-12)
