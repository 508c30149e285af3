"""BIP expert prices and BIP routing (workers.model.moe's `bip` strategy).

    q = bip_prices(s, k, iters, init=q_prev)             # prices only (any batch, e.g. EP-gathered)
    q, idx = bip_route(s, k, iters, init=q_prev)         # `pre`: q from this batch, then top-K of s - q
    q, idx = bip_route_causal(s, k, iters, init=q_prev)  # causal: route with q_prev, then refresh q

On CPU a compiled C++ kernel (cpu.py) fuses the rounds and the routing and returns the same q
and idx bit for bit; elsewhere (CUDA) and where it did not build, the PyTorch reference runs.
Semantics: reference.py. Scores are assumed finite (softmax / sigmoid outputs).
"""

from __future__ import annotations

import torch

from kernels._dispatch import check
from kernels.bip_select import cpu
from kernels.bip_select import reference as ref
from kernels.bip_select.reference import capacity, kth_largest

__all__ = ["bip_prices", "bip_route", "bip_route_causal", "capacity", "kth_largest"]


def _prepare(scores: torch.Tensor, k: int, iters: int, cap: int | None) -> tuple[int, bool]:
    """Checks the arguments; -> (cap, whether the CPU kernel runs)."""
    check(scores.dim() == 2, f"bip: scores must be [N, E], got shape {tuple(scores.shape)}")
    n, m = scores.shape
    ref.check_bip(m, k, iters)
    return (capacity(n, m, k) if cap is None else cap), scores.device.type == "cpu" and cpu.available()


def bip_prices(
    scores: torch.Tensor,
    k: int,
    iters: int,
    cap: int | None = None,
    init: torch.Tensor | None = None,
    token_prices: torch.Tensor | None = None,
) -> torch.Tensor:
    """scores [N, E], init [E] or None, token_prices [N] or None -> q [E] (see reference.bip_prices)."""
    cap, fused = _prepare(scores, k, iters, cap)
    if fused:
        return cpu.bip_select(scores, k, iters, cap, init, "none", token_prices)[0]
    return ref.bip_prices(scores, k, iters, cap, init, token_prices)


def bip_route(
    scores: torch.Tensor, k: int, iters: int, cap: int | None = None, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E], init [E] or None -> (q [E], idx [N, K]) (see reference.bip_route)."""
    cap, fused = _prepare(scores, k, iters, cap)
    if fused:
        return cpu.bip_select(scores, k, iters, cap, init, "pre")
    return ref.bip_route(scores, k, iters, cap, init)


def bip_route_causal(
    scores: torch.Tensor, k: int, iters: int, init: torch.Tensor, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E], init [E] -> (q [E], idx [N, K]) (see reference.bip_route_causal)."""
    cap, fused = _prepare(scores, k, iters, cap)
    if fused:
        return cpu.bip_select(scores, k, iters, cap, init, "causal")
    return ref.bip_route_causal(scores, k, iters, init, cap)
