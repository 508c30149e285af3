"""MoE dispatch: reference vs a per-token loop, Triton vs reference (outputs + all gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import moe_dispatch
from kernels.moe_dispatch import reference as ref
from tests.kernels._util import assert_close


def _inputs(n=13, k=2, e=4, d=24, f=40, seed=0, empty_expert=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(e - int(empty_expert), generator=g)[:k] for _ in range(n)])
    gates = torch.rand(n, k, generator=g, requires_grad=True)
    ws = [(torch.randn(e, *s, generator=g) / s[0] ** 0.5).requires_grad_() for s in ((d, f), (d, f), (f, d))]
    return x, idx, gates, *ws


def _moe(mod, x, idx, gates, wg, wu, wd):
    xs, order, counts = mod.permute(x, idx, wg.shape[0])
    return mod.unpermute(mod.grouped_swiglu(xs, counts, wg, wu, wd), order, gates)


def _per_token(x, idx, gates, wg, wu, wd):
    rows = []
    for n in range(x.shape[0]):
        y = 0
        for j in range(idx.shape[1]):
            e = idx[n, j]
            y = y + gates[n, j] * ((F.silu(x[n] @ wg[e]) * (x[n] @ wu[e])) @ wd[e])
        rows.append(y)
    return torch.stack(rows)


def _grads(out, inputs, seed=1):
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))


def test_permute_contract():
    x, idx, *_ = _inputs()
    xs, order, counts = ref.permute(x, idx, 4)
    assert counts.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist() and counts[3] == 0
    assert torch.equal(xs, x[order // 2])
    assert (idx.reshape(-1)[order].diff() >= 0).all()  # sorted by expert
    assert torch.equal(torch.sort(order).values, torch.arange(26))


def test_reference_matches_per_token_loop():
    args = _inputs()
    params = (args[0], args[2], *args[3:])
    out, want = _moe(ref, *args), _per_token(*args)
    assert_close("y", out, want, 1e-6)
    grads = _grads(out, params)
    for i, (a, b) in enumerate(zip(grads, _grads(want, params))):
        assert_close(f"grad{i}", a, b, 1e-5)
    assert grads[2][3].abs().sum() == 0  # the empty expert's w_gate gets no gradient


@pytest.mark.parametrize("n,k,e,d,f", [(13, 2, 4, 24, 40), (7, 1, 3, 48, 16)])
def test_triton_matches_reference(force_triton, n, k, e, d, f):
    args = _inputs(n, k, e, d, f, seed=n)
    params = (args[0], args[2], *args[3:])
    out = _moe(moe_dispatch, *args)
    want = _moe(ref, *args)
    assert_close("y", out, want, 1e-5)
    for name, a, b in zip(["x", "gates", "w_gate", "w_up", "w_down"], _grads(out, params), _grads(want, params)):
        assert_close(f"d{name}", a, b, 1e-5)


def test_bad_expert_index_is_rejected():
    x, idx, *_ = _inputs()
    with pytest.raises(ValueError, match=r"expert_idx values must be in \[0, 2\), got 0..2"):
        moe_dispatch.permute(x, idx, 2)
