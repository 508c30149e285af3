"""Decode attention over a packed KV cache (kernels.kv_quant layout) plus its full-precision window.

Serving calls this for every decode step of a KVTuner-quantized layer:

    out = decode_attention(q, k_packed, v_packed, packed_pos, k_win, v_win, win_pos, q_pos)

The Triton kernel is split-K over the packed slots with one specialisation per (k_bits, v_bits)
(compile-time constants); on CPU a compiled C++ kernel (cpu.py) fuses the dequantize into the
attention; the reference dequantizes block by block. Semantics: reference.py.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, triton_module, use_triton
from kernels.decode_attention import cpu
from kernels.decode_attention.reference import decode_attention as decode_attention_reference
from kernels.decode_attention.reference import decode_attention_dense
from kernels.kv_quant.reference import PackedKV

__all__ = ["decode_attention", "decode_attention_dense", "decode_attention_reference", "has_fast_path"]


def has_fast_path(q: torch.Tensor) -> bool:
    """True when decode_attention on q's device beats dequantizing the cache and attending
    (Triton on GPU, the compiled kernel on CPU); otherwise callers should read the cache as tensors."""
    return use_triton(q) or cpu.available()


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
    """q [B, T, H, Dh], k_packed/v_packed PackedKV (codes [B, Sq, Hkv, W]), packed_pos [B, Sq],
    k_win/v_win [B, Wn, Hkv, Dh] or None, win_pos [B, Wn] or None, q_pos [B, T] -> [B, T, H, Dh].

    Slot s is visible to query t iff 0 <= pos[s] <= q_pos[t] (pos -1 marks unfilled capacity).
    """
    check(q.dim() == 4, f"decode_attention: q must be [B, T, H, Dh], got shape {tuple(q.shape)}")
    b, t, h, dh = q.shape
    kc = k_packed.codes
    check(
        kc.shape[0] == b and h % kc.shape[2] == 0 and k_packed.dh == dh,
        f"decode_attention: k_packed codes {tuple(kc.shape)} (Dh={k_packed.dh}) do not match q {tuple(q.shape)}",
    )
    check(
        v_packed.codes.shape[:3] == kc.shape[:3] and v_packed.dh == dh,
        f"decode_attention: v_packed codes {tuple(v_packed.codes.shape)} do not match k_packed {tuple(kc.shape)}",
    )
    check(
        tuple(packed_pos.shape) == (b, kc.shape[1]),
        f"decode_attention: packed_pos must be [{b}, {kc.shape[1]}], got {tuple(packed_pos.shape)}",
    )
    check(tuple(q_pos.shape) == (b, t), f"decode_attention: q_pos must be [{b}, {t}], got {tuple(q_pos.shape)}")
    if k_win is not None:
        check(
            k_win.dim() == 4 and k_win.shape[0] == b and k_win.shape[2:] == kc.shape[2:3] + (dh,),
            f"decode_attention: k_win must be [{b}, Wn, {kc.shape[2]}, {dh}], got {tuple(k_win.shape)}",
        )
        check(
            v_win is not None and v_win.shape == k_win.shape,
            "decode_attention: v_win must have k_win's shape",
        )
        check(
            win_pos is not None and tuple(win_pos.shape) == (b, k_win.shape[1]),
            f"decode_attention: win_pos must be [{b}, {k_win.shape[1]}]",
        )
    if use_triton(q):
        return triton_module("decode_attention").decode_attention(
            q, k_packed, v_packed, packed_pos, k_win, v_win, win_pos, q_pos, scale
        )
    if cpu.available():
        return cpu.decode_attention(q, k_packed, v_packed, packed_pos, k_win, v_win, win_pos, q_pos, scale)
    return decode_attention_reference(q, k_packed, v_packed, packed_pos, k_win, v_win, win_pos, q_pos, scale)
