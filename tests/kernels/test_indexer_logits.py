"""Indexer logits: reference vs naive, Triton vs reference (outputs + grads), memory bound at L=8192."""

from __future__ import annotations

import pytest
import torch

from kernels import indexer_logits
from kernels.indexer_logits.reference import indexer_logits as reference
from kernels.indexer_logits.reference import indexer_logits_naive
from tests.kernels._util import LargestAllocation, assert_close


def _inputs(b, t, s, hi, di, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hi, di, generator=g, requires_grad=True)
    k = torch.randn(b, s, di, generator=g, requires_grad=True)
    w = torch.randn(b, t, hi, generator=g, requires_grad=True)
    q_pos = torch.arange(s - t, s).expand(b, t).clone()
    k_pos = torch.arange(s).expand(b, s).clone()
    if pad:
        k_pos[0, 3] = -1  # an evicted / padded key
        q_pos[-1, 0] = -1  # a padded query sees nothing
    return q, k, w, q_pos, k_pos


def _masked_grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out.masked_fill(torch.isinf(out), 0.0), inputs, g)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_reference_matches_naive_in_value_and_grad(chunk):
    q, k, w, qp, kp = _inputs(2, 29, 33, 3, 16)
    out = reference(q, k, w, qp, kp, chunk=chunk)
    naive = indexer_logits_naive(q, k, w, qp, kp)
    assert_close("logits", out, naive, 1e-6)
    assert torch.isinf(out[0, :, 3]).all() and torch.isinf(out[-1, 0]).all()
    for name, a, b in zip("qkw", _masked_grads(out, (q, k, w)), _masked_grads(naive, (q, k, w))):
        assert_close(f"d{name}", a, b, 1e-5)


@pytest.mark.parametrize("b,t,s,hi,di", [(1, 63, 63, 2, 48), (2, 17, 40, 3, 24)])
def test_triton_matches_reference(force_triton, b, t, s, hi, di):
    q, k, w, qp, kp = _inputs(b, t, s, hi, di)
    out = indexer_logits(q, k, w, qp, kp)
    ref = reference(q, k, w, qp, kp)
    assert_close("logits", out, ref, 1e-5)
    for name, a, r in zip("qkw", _masked_grads(out, (q, k, w)), _masked_grads(ref, (q, k, w))):
        assert_close(f"d{name}", a, r, 1e-5)


def test_chunked_path_never_materialises_l_l_h():
    """L = 8192: the chunked path's largest intermediate is <= chunk*L*H (run for real on CPU);
    the naive formulation's is L*L*H (recorded on the meta device, which allocates nothing)."""
    L, H, D, chunk = 8192, 2, 8, 512
    q, k, w, qp, kp = _inputs(1, L, L, H, D, pad=False)
    with torch.no_grad(), LargestAllocation() as rec:
        out = reference(q.detach(), k.detach(), w.detach(), qp, kp, chunk=chunk)
    assert out.shape == (1, L, L)
    assert rec.largest(exclude=out) <= chunk * L * H
    meta = [x.detach().to("meta") for x in (q, k, w, qp, kp)]
    with LargestAllocation() as rec_naive:
        indexer_logits_naive(*meta)
    assert rec_naive.largest() >= L * L * H
