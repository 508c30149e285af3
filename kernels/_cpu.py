"""One loader for the compiled CPU kernels (`kernels/<op>/cpu.cpp`), built once per machine.

Each op's `cpu.py` calls `load(op, source)`: the first call on a machine compiles the source with
torch's extension loader (tens of seconds; cached under TORCH_EXTENSIONS_DIR,
~/.cache/torch_extensions); where the build fails (no compiler) it returns None, one warning says
why, and the op keeps its PyTorch reference. `CALIBRAY_CPU_KERNELS=0` turns every compiled CPU
kernel off (the switch the benchmarks and tests use to time or check the reference path).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

ENV = "CALIBRAY_CPU_KERNELS"
BASE_CFLAGS = ("-O3", "-march=native")

log = logging.getLogger(__name__)


def enabled() -> bool:
    """False when the environment turns the compiled CPU kernels off."""
    return os.environ.get(ENV, "1") not in ("0", "false", "False")


def load(op: str, source: Path, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """The compiled module of `source` for kernel `op`, or None (switched off, or the build failed).

    The switch is read on every call, so setting it at run time (benchmarks timing both paths in
    one process) takes effect at once; the build is attempted once per process.
    """
    return _build(op, source, extra_cflags) if enabled() else None


@functools.cache
def _build(op: str, source: Path, extra_cflags: tuple[str, ...]) -> ModuleType | None:
    from torch.utils.cpp_extension import load as build

    try:
        return build(name=f"calibray_{op}_cpu", sources=[str(source)], extra_cflags=[*BASE_CFLAGS, *extra_cflags])
    except Exception as e:  # noqa: BLE001 - any build failure means: no fast path on this machine
        log.warning("%s: the CPU kernel did not build (%s); using the PyTorch path", op, str(e)[:300])
        return None
