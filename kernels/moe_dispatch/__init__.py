"""MoE dispatch: permute tokens by expert, grouped SwiGLU expert matmul, gated unpermute.

The one MoE dispatch interface of the project (MoE training and serving). On CPU the
reference (per-expert loop) runs; on CUDA the Triton kernels.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, triton_module, use_triton
from kernels.moe_dispatch import reference

__all__ = ["grouped_swiglu", "permute", "unpermute"]


def permute(
    x: torch.Tensor, expert_idx: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D], expert_idx [N, K] -> (x_sorted [N*K, D], order [N*K], counts [E]); see reference."""
    check(x.dim() == 2, f"permute: x must be [N, D], got shape {tuple(x.shape)}")
    check(
        expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0],
        f"permute: expert_idx must be [N={x.shape[0]}, K], got shape {tuple(expert_idx.shape)}",
    )
    check(n_experts >= 1, f"permute: n_experts must be >= 1, got {n_experts}")
    if expert_idx.numel():
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        check(
            lo >= 0 and hi < n_experts,
            f"permute: expert_idx values must be in [0, {n_experts}), got {lo}..{hi}",
        )
    if use_triton(x):
        return triton_module("moe_dispatch").permute(x, expert_idx, n_experts)
    return reference.permute(x, expert_idx, n_experts)


def grouped_swiglu(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x_sorted [N*K, D], counts [E], w_gate/w_up [E, D, F], w_down [E, F, D] -> [N*K, D]."""
    e, d, f = w_gate.shape
    check(
        w_up.shape == w_gate.shape,
        f"grouped_swiglu: w_up {tuple(w_up.shape)} != w_gate {tuple(w_gate.shape)}",
    )
    check(
        tuple(w_down.shape) == (e, f, d),
        f"grouped_swiglu: w_down must be [{e}, {f}, {d}], got {tuple(w_down.shape)}",
    )
    check(
        x_sorted.dim() == 2 and x_sorted.shape[1] == d,
        f"grouped_swiglu: x_sorted must be [M, {d}], got {tuple(x_sorted.shape)}",
    )
    check(counts.numel() == e, f"grouped_swiglu: counts must have E={e} entries, got {counts.numel()}")
    if use_triton(x_sorted):
        return triton_module("moe_dispatch").grouped_swiglu(x_sorted, counts, w_gate, w_up, w_down)
    return reference.grouped_swiglu(x_sorted, counts, w_gate, w_up, w_down)


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """y_sorted [N*K, D], order [N*K], gates [N, K] -> [N, D]."""
    check(gates.dim() == 2, f"unpermute: gates must be [N, K], got shape {tuple(gates.shape)}")
    check(
        y_sorted.shape[0] == gates.numel() == order.numel(),
        f"unpermute: y_sorted rows {y_sorted.shape[0]}, order {order.numel()} and gates N*K {gates.numel()} differ",
    )
    if use_triton(y_sorted):
        return triton_module("moe_dispatch").unpermute(y_sorted, order, gates)
    return reference.unpermute(y_sorted, order, gates)
