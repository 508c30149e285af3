"""The CPU fast path of decode attention: `cpu.cpp`, compiled once per machine with torch's extension loader.

Dequantizing the whole packed cache and then attending (what a cache view costs when read as
tensors) is 3-5x a full-precision attention on CPU at 2048 tokens; the fused kernel reads the
codes once and is within ~1.2x of it (benchmarks.decode_cpu). It needs a C++ compiler: the first
use on a machine builds it (~40 s, cached under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions);
where the build fails (no compiler) `available()` is False, one warning says why, and callers
keep the reference path. `CALIBRAY_CPU_KERNELS=0` turns the fast path off (kernels/_cpu.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import torch

from kernels._cpu import load
from kernels.kv_quant.reference import PackedKV

SOURCE = Path(__file__).with_name("cpu.cpp")
# Reassociation lets the compiler vectorise the dot products and sums; infinities (the running
# max starts at -inf) stay defined, unlike -ffast-math.
CFLAGS = ("-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")


def _module() -> ModuleType | None:
    return load("decode_attention", SOURCE, CFLAGS)


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
