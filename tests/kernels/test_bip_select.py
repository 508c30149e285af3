"""The fused CPU BIP kernel against the PyTorch reference: the same q and idx, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kernels import bip_select
from kernels.bip_select import cpu, reference
from kernels.bip_select.reference import capacity


def scores(kind: str, n: int, m: int, seed: int) -> torch.Tensor:
    """[n, m] scores: random softmax, coarse (many exact ties), or skewed towards the last experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g)
    if kind == "skewed":
        return (x + torch.linspace(0, 3, m)).softmax(-1)
    if kind == "tied":  # values on a 1/8 grid: ties inside rows, across the K-th boundary, in columns
        return ((x + torch.linspace(0, 2, m)).sigmoid() * 8).round() / 8
    return x.softmax(-1)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.available(), "the CPU BIP kernel did not build (see kernels/bip_select/cpu.py)"


CASES = [
    (kind, n, m, k) for kind in ("random", "tied", "skewed") for n, m, k in ((63, 8, 2), (257, 16, 4), (96, 64, 17))
]


@pytest.mark.parametrize("kind,n,m,k", CASES)
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_fused_kernel_is_bit_exact(kind, n, m, k, iters):
    s = scores(kind, n, m, seed=n + m + iters)
    warm = reference.bip_prices(scores(kind, n, m, seed=7), k, 2)  # a q carried from another batch
    assert float(warm.max()) > 0
    for init in (None, warm):
        q, idx = cpu.bip_select(s, k, iters, capacity(n, m, k), init, "pre")
        want_q, want_idx = reference.bip_route(s, k, iters, init=init)
        assert torch.equal(q, want_q) and torch.equal(idx, want_idx)
        assert torch.equal(cpu.bip_select(s, k, iters, capacity(n, m, k), init, "none")[0], want_q)
        assert torch.equal(bip_select.bip_prices(s, k, iters, init=init), want_q)
    q, idx = bip_select.bip_route_causal(s, k, iters, warm)
    want_q, want_idx = reference.bip_route_causal(s, k, iters, warm)
    assert torch.equal(q, want_q) and torch.equal(idx, want_idx)
    # token prices given for the first round (what the causal router passes) are used as is
    p = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.1
    got = bip_select.bip_prices(s, k, iters, init=warm, token_prices=p)
    assert torch.equal(got, reference.bip_prices(s, k, iters, init=warm, token_prices=p))


def test_ties_come_out_in_torch_topk_order():
    """torch.topk's order among exact ties is not the lowest index; the kernel's is torch's."""
    s = (torch.randint(0, 3, (4096, 16), generator=torch.Generator().manual_seed(0)) / 2).float()
    zero = torch.zeros(16)
    lowest = torch.sort(s, descending=True, stable=True).indices[:, :2]
    want = s.topk(2, dim=-1).indices
    assert not torch.equal(want, lowest)
    # iters = 0: no rounds, a plain top-K of s - init (the benchmark's fused top-K)
    assert torch.equal(cpu.bip_select(s, 2, 0, capacity(4096, 16, 2), zero, "pre")[1], want)
    assert torch.equal(cpu.bip_select(s, 2, 0, 0, zero, "causal")[1], (s - zero).topk(3, dim=-1).indices[:, :2])


def test_unbinding_capacity_gives_zero_prices_from_any_start():
    s = scores("random", 40, 8, seed=0)
    warm = torch.full((8,), 0.3)
    q, idx = bip_select.bip_route(s, 2, 2, cap=40, init=warm)
    assert torch.equal(q, torch.zeros(8)) and torch.equal(idx, s.topk(2, dim=-1).indices)
    assert torch.equal(q, reference.bip_prices(s, 2, 2, cap=40, init=warm))


def test_arguments_are_checked_before_the_kernel():
    s = scores("random", 16, 4, seed=0)
    with pytest.raises(ValueError, match="top_k=4"):
        bip_select.bip_route(s, 4, 2)
    with pytest.raises(ValueError, match="bip_iters"):
        bip_select.bip_route_causal(s, 2, 0, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        bip_select.bip_prices(s[0], 2, 1)
