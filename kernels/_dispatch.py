"""One dispatch rule for every kernel: CUDA tensors -> Triton, CPU -> PyTorch reference.

`CALIBRAY_FORCE_TRITON=1` forces the Triton path on any device; tests set it together with
`TRITON_INTERPRET=1` so the real kernels run on CPU through Triton's interpreter. The Triton
modules are imported lazily (once) so that CPU-only users never pay for `import triton`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

FORCE_ENV = "CALIBRAY_FORCE_TRITON"
_modules: dict[str, ModuleType] = {}


def force_triton() -> bool:
    """True when the environment asks for the Triton path everywhere."""
    return os.environ.get(FORCE_ENV, "0") not in ("", "0", "false", "False")


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch decision for an op whose main input is `t`."""
    return t.is_cuda or force_triton()


def triton_module(op: str) -> ModuleType:
    """`kernels.<op>.triton`, imported on first use."""
    if op not in _modules:
        _modules[op] = importlib.import_module(f"kernels.{op}.triton")
    return _modules[op]


def check(cond: bool, msg: str) -> None:
    """Raise a ValueError naming the bad value before any work starts."""
    if not cond:
        raise ValueError(msg)
