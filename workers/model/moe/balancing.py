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
"""

from __future__ import annotations

import math

import torch

STRATEGIES = ("none", "aux_loss", "loss_free", "bip")
BIP_MODES = ("pre", "causal")


def capacity(n_tokens: int, n_experts: int, k: int) -> int:
    """Balanced per-expert capacity cap = ceil(K * N / E) (the BIP expert constraint)."""
    if n_tokens < 0 or n_experts <= 0 or k <= 0:
        raise ValueError(f"capacity needs n_tokens>=0, n_experts>0, k>0; got {n_tokens}, {n_experts}, {k}")
    return math.ceil(k * n_tokens / n_experts)


def select_topk(scores: torch.Tensor, k: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the K best experts per token under `scores + offset`.

    scores [N, E], offset [E] or None -> idx [N, K] int64 (descending adjusted score;
    torch.topk breaks exact ties towards the lower index on CPU and CUDA alike).
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


def bip_prices(
    scores: torch.Tensor,
    k: int,
    iters: int,
    cap: int | None = None,
    init: torch.Tensor | None = None,
    token_prices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert prices q [E] >= 0 for one batch, from T block-coordinate dual steps.

    scores [N, E] (no gradient is taken); init [E]: the q to start from (the layer's q of the
    previous step when q is carried, as the paper maintains it) or None for 0 (restart). Each
    round:
      p_i = max(0, (K+1)-th largest over experts of s_ij - q_j)      token prices [N]
      q_j = max(0, (cap+1)-th largest over tokens of s_ij - p_i)     expert prices [E]
    With q fixed, top-K of s - q then fills no expert much beyond cap. Cost O(T * N * E):
    two selections per round, no sort. token_prices [N]: the first round's p for `init`, when
    the caller already has it (the causal router reads it off its routing top-(K+1)).
    """
    n, m = scores.shape
    if not 0 < k < m:
        raise ValueError(f"bip needs 0 < top_k < n_experts, got top_k={k}, n_experts={m}")
    if iters < 1:
        raise ValueError(f"bip_iters must be >= 1, got {iters}")
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


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_j load_j - mean load) / mean load; load [..., E] -> [...]."""
    load = load.float()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.clamp_min(1e-12)
