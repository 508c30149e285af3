"""Deterministic top-k: ordering rules (reference vs a stable full sort) and Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels import topk_indices
from kernels.topk.reference import topk_indices as reference


def _stable_oracle(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Stable descending full sort: ties keep the lowest index; -inf/NaN become -1 padding."""
    x = torch.nan_to_num(logits.float(), nan=float("-inf"), neginf=float("-inf"))
    srt = torch.sort(x, dim=-1, descending=True, stable=True)
    idx = srt.indices.masked_fill(srt.values == float("-inf"), -1)[..., :k]
    pad = k - idx.shape[-1]
    return torch.nn.functional.pad(idx, (0, pad), value=-1) if pad > 0 else idx


def _tied_logits(b, t, s, seed):
    """Few distinct values (many ties), causal -inf, a NaN and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (b, t, s), generator=g).float()
    x = x.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(s - t + 1), float("-inf"))
    x[0, 0, 0] = float("nan")
    x[0, -1, 1] = -0.0
    return x


@pytest.mark.parametrize("s,k", [(9, 4), (9, 12), (40, 8), (63, 40), (200, 16)])
def test_reference_matches_stable_sort(s, k):
    for seed in range(3):
        x = _tied_logits(2, 6, s, seed)
        assert torch.equal(reference(x, k), _stable_oracle(x, k))
        y = torch.randn(2, 6, s, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(reference(y, k), _stable_oracle(y, k))


def test_padding_and_order_by_hand():
    x = torch.tensor([[[1.0, 3.0, 3.0, float("-inf"), 2.0], [float("-inf")] * 5]])
    assert reference(x, 4).tolist() == [[[1, 2, 4, 0], [-1, -1, -1, -1]]]


@pytest.mark.parametrize("s,k", [(9, 12), (63, 8)])
def test_triton_matches_reference(force_triton, s, k):
    """(9, 12): one block, padding; (63, 8): four blocks merged. Few rows: sorting is slow interpreted."""
    x = _tied_logits(1, 2, s, seed=s)
    assert torch.equal(topk_indices(x, k), reference(x, k))
    y = torch.randn(1, 1, s, generator=torch.Generator().manual_seed(k))
    assert torch.equal(topk_indices(y, k), reference(y, k))


def test_bad_k_is_rejected_before_work():
    with pytest.raises(ValueError, match="k must be a positive int"):
        topk_indices(torch.zeros(1, 2, 3), 0)
