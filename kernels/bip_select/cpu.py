"""The CPU fast path of BIP selection: `cpu.cpp`, compiled once per machine (kernels/_cpu.py).

In eager PyTorch a `pre` BIP router at T = 1 is three selection passes over the [N, E] scores
(the (K+1)-th over experts, the (cap+1)-th over tokens, the routing top-K), each a handful of
dispatched ops; the fused call does the rounds and the routing in one C++ call with the same
floats out (benchmarks.moe times both). Where the build fails, `available()` is False and the
reference runs.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from kernels._cpu import load

SOURCE = Path(__file__).with_name("cpu.cpp")
ROUTES = {"none": 0, "pre": 1, "causal": 2}


def _module() -> ModuleType | None:
    return load("bip_select", SOURCE)


def available() -> bool:
    """True when the compiled kernel loads on this machine (built on first call)."""
    return _module() is not None


def bip_select(
    scores: torch.Tensor,
    k: int,
    iters: int,
    cap: int,
    init: torch.Tensor | None,
    route: str,
    token_prices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E], init [E] or None (0), token_prices [N] or None -> (q [E], idx [N, K] or [N, 0]).

    route "none": prices only; "pre": T rounds, then top-K of s - q; "causal": top-K of
    s - init routes (its (K+1)-th value is round 1's p), then T rounds. iters = 0 with "pre" is a
    plain top-K of s - init. Arguments are checked by the caller (kernels.bip_select).
    """
    s = scores.detach().float().contiguous()  # [N, E]
    q0 = s.new_zeros(s.shape[1]) if init is None else init.detach().float().contiguous()
    p0 = None if token_prices is None else token_prices.detach().float().contiguous()
    return _module().bip_select(s, q0, k, cap, iters, ROUTES[route], p0)
