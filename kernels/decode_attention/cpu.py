"""The CPU fast path of decode attention: `cpu.cpp`, compiled once per machine with torch's extension loader.

Dequantizing the whole packed cache and then attending (what a cache view costs when read as
tensors) is 3-5x a full-precision attention on CPU at 2048 tokens; the fused kernel reads the
codes once and is within ~1.2x of it (benchmarks.decode_cpu). It needs a C++ compiler: the first
use on a machine builds it (~40 s, cached under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions);
where the build fails (no compiler) `available()` is False, one warning says why, and callers
keep the reference path. `CALIBRAY_CPU_KERNELS=0` turns the fast path off.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from types import ModuleType

import torch

from kernels.kv_quant.reference import PackedKV

ENV = "CALIBRAY_CPU_KERNELS"
SOURCE = Path(__file__).with_name("cpu.cpp")
# Reassociation lets the compiler vectorise the dot products and sums; infinities (the running
# max starts at -inf) stay defined, unlike -ffast-math.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

log = logging.getLogger(__name__)


@functools.cache
def _module() -> ModuleType | None:
    if os.environ.get(ENV, "1") in ("0", "false", "False"):
        return None
    from torch.utils.cpp_extension import load

    try:
        return load(name="calibray_decode_attention_cpu", sources=[str(SOURCE)], extra_cflags=CFLAGS)
    except Exception as e:  # noqa: BLE001 - any build failure means: no fast path on this machine
        log.warning("decode attention: the CPU kernel did not build (%s); using the PyTorch path", str(e)[:300])
        return None


def available() -> bool:
    """True when the compiled kernel loads on this machine (built on first call)."""
    return _module() is not None


def decode_attention(
    q: torch.Tensor,
    k_packed: PackedKV,
    v_packed: PackedKV,
    packed_pos: torch.Tensor,
    k_win: torch.Tensor | None,
    v_win: torch.Tensor | None,
    win_pos: torch.Tensor | None,
    q_pos: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as kernels.decode_attention.decode_attention (shapes checked there); CPU tensors."""
    b, _, h, dh = q.shape
    hkv = k_packed.codes.shape[2]
    if k_win is None:
        k_win = v_win = q.new_zeros(b, 0, hkv, dh)
        win_pos = q_pos.new_zeros(b, 0)
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    f32 = [t.float().contiguous() for t in (q, k_win, v_win)]
    out = _module().packed_decode(
        f32[0],
        *_side(k_packed),
        *_side(v_packed),
        packed_pos.long().contiguous(),
        f32[1],
        f32[2],
        win_pos.long().contiguous(),
        q_pos.long().contiguous(),
        scale,
    )
    return out.to(q.dtype)


def _side(p: PackedKV) -> tuple:
    return p.codes.contiguous(), p.scale.contiguous(), p.zero.contiguous(), p.bits, p.rt, p.rc
