"""Comparison helpers for kernel tests (relative RMS error, as in fla's test suite)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, float]:
    """(relative RMS error, max abs error, mean abs error) over the finite entries of expected."""
    a, e = actual.detach().double(), expected.detach().double()
    fin = torch.isfinite(e)
    d = (a - e)[fin]
    if d.numel() == 0:
        return 0.0, 0.0, 0.0
    rms = d.pow(2).mean().sqrt() / e[fin].pow(2).mean().sqrt().clamp_min(1e-12)
    return float(rms), float(d.abs().max()), float(d.abs().mean())


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Same shape, same non-finite pattern, relative RMS error <= tol; prints max/mean error on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any() or torch.equal(torch.isnan(actual), torch.isnan(expected)), (
        f"{name}: NaN in output (a skipped write reads poisoned memory)"
    )
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{name}: -inf pattern differs"
    rms, mx, mean = rel_error(actual, expected)
    print(f"{name}: rel-rms {rms:.2e}  max-abs {mx:.2e}  mean-abs {mean:.2e}")
    assert rms <= tol, f"{name}: relative RMS error {rms:.3e} > {tol:.1e} (max abs {mx:.3e}, mean abs {mean:.3e})"


class LargestAllocation(TorchDispatchMode):
    """Records the element count of every storage an op returns (except `exclude`d ones)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.sizes.append((st.data_ptr(), st.nbytes() // t.element_size()))
        return out

    def largest(self, exclude: torch.Tensor | None = None) -> int:
        skip = exclude.untyped_storage().data_ptr() if exclude is not None else None
        return max(n for ptr, n in self.sizes if ptr != skip or ptr == 0)
