"""Attention received per key: reference vs the full probability map, chunking, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels import attention_received
from kernels.attention_received.reference import attention_received as reference
from tests.kernels._util import LargestAllocation, assert_close


def _inputs(b, t, s, h, hkv, dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, h, dh, generator=g), torch.randn(b, s, hkv, dh, generator=g)
    q_pos = torch.arange(s - t, s).expand(b, t).clone()
    k_pos = torch.arange(s).expand(b, s).clone()
    k_pos[0, 2] = -1  # an evicted key receives nothing
    q_pos[-1, 0] = -1  # a padded query gives nothing
    return q, k, q_pos, k_pos


def _full_map(q, k, q_pos, k_pos):
    h, hkv = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(h // hkv, dim=2)
    sc = torch.einsum("bthd,bshd->bhts", q, kk) / q.shape[-1] ** 0.5
    vis = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    p = torch.softmax(sc.masked_fill(~vis[:, None], float("-inf")), -1).nan_to_num(0.0)
    return p.sum(2).mean(1)


@pytest.mark.parametrize("chunk", [1, 6, None])
def test_reference_matches_full_map(chunk):
    args = _inputs(2, 21, 37, 4, 2, 16)
    out = reference(*args, chunk=chunk)
    assert_close("received", out, _full_map(*args), 1e-6)
    assert out[0, 2] == 0
    # every visible query distributes exactly one unit of attention per head
    assert torch.allclose(out.sum(-1), torch.tensor([21.0, 20.0]))


@pytest.mark.parametrize("h,hkv", [(4, 1), (2, 2)])
def test_triton_matches_reference(force_triton, h, hkv):
    args = _inputs(1, 21, 37, h, hkv, 48, seed=h)
    assert_close("received", attention_received(*args), reference(*args), 1e-5)


def test_chunked_path_never_holds_the_full_map():
    """L = 1024: the largest intermediate is <= chunk * H * L elements, never L * L * H."""
    L, H, chunk = 1024, 2, 32
    q, k, q_pos, k_pos = _inputs(1, L, L, H, 1, 8)
    with LargestAllocation() as rec:
        out = reference(q, k, q_pos, k_pos, chunk=chunk)
    assert out.shape == (1, L)
    assert rec.largest(exclude=out) <= chunk * H * L < L * L * H
