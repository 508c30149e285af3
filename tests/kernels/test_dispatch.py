"""The dispatch rule: CPU tensors take the reference unless CALIBRAY_FORCE_TRITON=1."""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels._dispatch as dispatch
from kernels import attention_received, indexer_logits, sparse_attention, topk_indices


def test_cpu_takes_the_reference(monkeypatch):
    monkeypatch.delenv("CALIBRAY_FORCE_TRITON", raising=False)

    def boom(op):
        raise AssertionError(f"Triton path taken for {op} on CPU")

    for name in ("indexer_logits", "topk", "sparse_attention", "attention_received", "moe_dispatch"):
        monkeypatch.setattr(importlib.import_module(f"kernels.{name}"), "triton_module", boom)
    q, k, w = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 2)
    pos = torch.arange(4)[None]
    idx = topk_indices(indexer_logits(q, k, w, pos, pos), 2)
    sparse_attention(q, k[:, :, None], k[:, :, None], idx)
    attention_received(q, k[:, :, None], pos, pos)


def test_force_flag(monkeypatch):
    monkeypatch.setenv("CALIBRAY_FORCE_TRITON", "1")
    assert dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("CALIBRAY_FORCE_TRITON", "0")
    assert not dispatch.use_triton(torch.zeros(1))


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"w must be \[1, 4, 2\], got \(1, 4, 3\)"):
        z = torch.zeros
        indexer_logits(z(1, 4, 2, 8), z(1, 4, 8), z(1, 4, 3), z(1, 4), z(1, 4))
