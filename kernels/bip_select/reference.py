"""BIP expert prices and BIP routing, pure PyTorch (ground truth, and the path off CPU).

Shape legend: N tokens in the (expert-parallel) batch, E experts, K experts per token.

The prices q [E] >= 0 come from T rounds of block-coordinate minimisation of the dual of the LP
relaxation of  max sum s_ij x_ij  s.t.  sum_j x_ij <= K,  sum_i x_ij <= cap,  0 <= x <= 1:
  p_i = max(0, (K+1)-th largest over experts of s_ij - q_j)      token prices [N]
  q_j = max(0, (cap+1)-th largest over tokens of s_ij - p_i)     expert prices [E]
and a token is routed to the top-K of s_i - q (torch.topk's order; its order among exact ties
is libstdc++'s nth_element's, not the lowest index). Every value is an fp32 element of s - q or
s - p, so any path that selects instead of sorting returns the same floats.
"""

from __future__ import annotations

import math

import torch


def capacity(n_tokens: int, n_experts: int, k: int) -> int:
    """Balanced per-expert capacity cap = ceil(K * N / E) (the BIP expert constraint)."""
    if n_tokens < 0 or n_experts <= 0 or k <= 0:
        raise ValueError(f"capacity needs n_tokens>=0, n_experts>0, k>0; got {n_tokens}, {n_experts}, {k}")
    return math.ceil(k * n_tokens / n_experts)


def kth_largest(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th largest value of x along `dim` (1-based), without sorting.

    A selection, not a sort: near the top (k - 1 rounds of argmax + masking, then one max;
    the cheapest on short axes such as E experts) or through an unsorted partial top-k on the
    smaller side, whose min (or max) is the k-th value. Exact: the result is one of x's
    elements, the same float a full sort would give.
    """
    n = x.shape[dim]
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest needs 1 <= k <= {n}, got k={k}")
    # K + 1 <= 4 over E experts: argmax + masking rounds; on CPU 2x faster than torch.topk at
    # E = 64 and at 8192 x 16, about 25% slower at 1024 x 16 (per-op overhead dominates there)
    if k <= 4:
        if k == 1:
            return x.amax(dim)
        x = x.clone()
        for _ in range(k - 1):
            x.scatter_(dim, x.argmax(dim, keepdim=True), float("-inf"))
        return x.amax(dim)
    if k <= n - k + 1:
        return x.topk(k, dim=dim, sorted=False).values.amin(dim)
    return x.topk(n - k + 1, dim=dim, largest=False, sorted=False).values.amax(dim)


def check_bip(n_experts: int, k: int, iters: int) -> None:
    """The argument rules every BIP entry point shares (before any work)."""
    if not 0 < k < n_experts:
        raise ValueError(f"bip needs 0 < top_k < n_experts, got top_k={k}, n_experts={n_experts}")
    if iters < 1:
        raise ValueError(f"bip_iters must be >= 1, got {iters}")


def bip_prices(
    scores: torch.Tensor,
    k: int,
    iters: int,
    cap: int | None = None,
    init: torch.Tensor | None = None,
    token_prices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert prices q [E] >= 0 for one batch, from T = `iters` block-coordinate dual steps.

    scores [N, E] (no gradient is taken); init [E]: the q to start from (the layer's q of the
    previous step when q is carried, as the paper maintains it) or None for 0 (restart).
    With q fixed, top-K of s - q then fills no expert much beyond cap. Cost O(T * N * E):
    two selections per round, no sort. token_prices [N]: the first round's p for `init`, when
    the caller already has it (the causal router reads it off its routing top-(K+1)).
    """
    n, m = scores.shape
    check_bip(m, k, iters)
    cap = capacity(n, m, k) if cap is None else cap
    s = scores.detach().float()  # [N, E]
    q = s.new_zeros(m) if init is None else init.detach().to(s).clone()  # [E]
    if cap >= n:  # the expert constraints cannot bind: every price is 0
        return q.zero_()
    s_t = s.t().contiguous()  # [E, N]: the per-expert selection runs over contiguous rows
    p = token_prices
    for _ in range(iters):
        if p is None:
            p = kth_largest(s - q, k + 1, dim=1).clamp_min(0)  # [N]
        q = kth_largest(s_t - p.to(s), cap + 1, dim=1).clamp_min(0)  # [E]
        p = None
    return q


def bip_route(
    scores: torch.Tensor, k: int, iters: int, cap: int | None = None, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre` BIP routing: q from the batch's own T rounds, then each token's top-K of s - q.

    scores [N, E], init [E] or None -> (q [E], idx [N, K] int64, descending s - q).
    """
    q = bip_prices(scores, k, iters, cap, init)
    return q, (scores.detach().float() - q).topk(k, dim=-1).indices


def bip_route_causal(
    scores: torch.Tensor, k: int, iters: int, init: torch.Tensor, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal BIP routing with q carried: route with the previous q, then refresh it on the batch.

    scores [N, E], init [E] (the previous step's q) -> (q [E] after T rounds from init,
    idx [N, K] = top-K of s - init). One top-(K+1) routes the batch (first K) and gives the
    first round's token prices (the (K+1)-th value) for free.
    """
    top = (scores.detach().float() - init.to(torch.float32)).topk(k + 1, dim=-1)
    q = bip_prices(scores, k, iters, cap, init, token_prices=top.values[:, k].clamp_min(0))
    return q, top.indices[:, :k]
