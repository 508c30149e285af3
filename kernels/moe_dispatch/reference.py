"""MoE dispatch, pure PyTorch (ground truth and CPU path). Autograd differentiates all three.

Shape legend: N tokens, K experts per token, E experts, D model width, F expert hidden width.
The flat assignment a = n * K + j (token n, its j-th expert) is sorted by expert with a
stable sort, so within an expert tokens keep their original order (deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def permute(
    x: torch.Tensor, expert_idx: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D], expert_idx [N, K] -> (x_sorted [N*K, D], order [N*K] int64, counts [E] int64).

    x_sorted[i] = x[order[i] // K]; order[i] is the flat assignment placed at slot i; rows of
    expert e occupy slots cumsum(counts)[e-1] : cumsum(counts)[e].
    """
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return x[order // k], order, counts


def grouped_swiglu(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x_sorted [N*K, D], counts [E], w_gate/w_up [E, D, F], w_down [E, F, D] -> [N*K, D].

    Row block of expert e: (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]. A per-expert loop
    (torch._grouped_mm has no CPU backward).
    """
    outs = []
    for e, xe in enumerate(x_sorted.split(counts.tolist())):
        if xe.shape[0] == 0:
            continue
        h = F.silu(xe @ w_gate[e]) * (xe @ w_up[e])  # [n_e, F]
        outs.append(h @ w_down[e])  # [n_e, D]
    if not outs:
        return x_sorted.new_zeros(0, w_down.shape[2]) + 0 * w_down.sum()
    return torch.cat(outs, dim=0)


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """y_sorted [N*K, D], order [N*K], gates [N, K] -> [N, D] = sum_j gates[n, j] * y[n, j]."""
    n, k = gates.shape
    y = torch.zeros_like(y_sorted).index_copy(0, order, y_sorted).view(n, k, -1)  # [N, K, D]
    return torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1)
