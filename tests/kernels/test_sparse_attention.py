"""Sparse attention: reference vs the dense-masked oracle, Triton vs reference (outputs + grads)."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import sparse_attention
from kernels.sparse_attention.reference import causal_attention, dense_masked_attention
from kernels.sparse_attention.reference import sparse_attention as reference
from kernels.topk.reference import topk_indices
from tests.kernels._util import assert_close


def _inputs(b, t, h, hkv, dh, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dh, generator=g, requires_grad=True)
    kk = torch.randn(b, t, hkv, dh, generator=g, requires_grad=True)
    v = torch.randn(b, t, hkv, dh, generator=g, requires_grad=True)
    logits = torch.randn(b, t, t, generator=g).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    idx = topk_indices(logits, k)  # early queries have fewer than k candidates: -1 padding
    idx[0, 5] = -1  # a query with no index at all returns zeros
    return q, kk, v, idx


def _grads(out, inputs, seed=1):
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 1)])
def test_reference_matches_dense_oracle(h, hkv):
    q, k, v, idx = _inputs(2, 63, h, hkv, 48, 9)
    out, oracle = reference(q, k, v, idx), dense_masked_attention(q, k, v, idx)
    assert_close("out", out, oracle, 1e-6)
    assert out[0, 5].abs().sum() == 0
    for name, a, b in zip("qkv", _grads(out, (q, k, v)), _grads(oracle, (q, k, v))):
        assert_close(f"d{name}", a, b, 1e-6)


def test_full_index_set_equals_causal_attention():
    """With every earlier key selected, sparse attention is ordinary causal attention."""
    q, k, v, _ = _inputs(1, 20, 4, 2, 16, 1)
    t = 20
    idx = torch.arange(t).expand(t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -1)[None]
    pos = torch.arange(t)[None]
    assert_close("out", reference(q, k, v, idx), causal_attention(q, k, v, pos, pos), 1e-6)


def test_reference_no_grad_chunking_is_exact(monkeypatch):
    # importlib: the package attribute kernels.sparse_attention is the public function
    ref_mod = importlib.import_module("kernels.sparse_attention.reference")
    q, k, v, idx = _inputs(1, 33, 2, 1, 8, 5)
    with torch.no_grad():
        whole = reference(q, k, v, idx)
        monkeypatch.setattr(ref_mod, "DEFAULT_BUDGET", 5 * 8 * 4)  # 4 queries per chunk
        assert torch.equal(reference(q, k, v, idx), whole)


@pytest.mark.parametrize("b,t,h,hkv,dh,k", [(1, 63, 4, 1, 48, 16), (1, 21, 4, 4, 48, 7), (2, 9, 2, 2, 16, 20)])
def test_triton_matches_reference(force_triton, b, t, h, hkv, dh, k):
    q, kk, v, idx = _inputs(b, t, h, hkv, dh, k)
    out = sparse_attention(q, kk, v, idx)
    ref = reference(q, kk, v, idx)
    assert_close("out", out, ref, 1e-5)
    for name, a, r in zip("qkv", _grads(out, (q, kk, v)), _grads(ref, (q, kk, v))):
        assert_close(f"d{name}", a, r, 1e-5)


def test_bad_shapes_are_rejected_before_work():
    q, k, v, idx = _inputs(1, 8, 3, 2, 8, 2)
    with pytest.raises(ValueError, match="Hkv"):
        sparse_attention(q, k, v, idx)
