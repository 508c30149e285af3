"""Kernel-test fixtures: Triton's interpreter, a forced Triton path, NaN-filled fresh memory.

TRITON_INTERPRET=1 is set by tests/conftest.py before any test module is imported (Triton reads it
once, at its first import), so every @triton.jit kernel runs in Triton's interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def force_triton(monkeypatch):
    """Route the public kernels.* functions to their Triton path for this test."""
    monkeypatch.setenv("CALIBRAY_FORCE_TRITON", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Small kernel tests run single-threaded: on a shared, oversubscribed 2-core box every
    2-thread intra-op parallel op waits for its slower thread (measured 15x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Fresh torch.empty / empty_like memory is NaN (floats) or a sentinel (ints), so a kernel
    that skips a write produces garbage the comparison catches instead of lucky zeros."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-123456789)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
