"""A cache view whose oldest tokens are still packed codes: read as tensors only when asked.

`KVView` holds every visible key and value as tensors, so a quantized cache that returns one
dequantizes all of its packed tokens on every decode step, layer by layer: on CPU that costs 3-5x
the attention itself at 2048 tokens. `PackedKVView` keeps the packed part (kernels.kv_quant layout)
and the full-precision window apart: `fused_attend` runs kernels.decode_attention on the codes for
a one-token decode step where a fast path exists, and `k` / `v` are dequantized on first read for
everything else (prefill, observers that score keys, DSA indexers, a device without a fast path).
Both give the same attention up to float rounding (tests/kvtuner/test_packed_view.py).
"""

from __future__ import annotations

from functools import cached_property

import torch

from kernels.decode_attention import decode_attention, has_fast_path
from kernels.kv_quant.reference import PackedKV, unpack_dequantize


def _cat(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return a if b is None or b.shape[1] == 0 else torch.cat([a, b], 1)


class PackedKVView:
    """Duck-types workers.caches.protocol.KVView: k, v [B, S, Hkv, Dh], pos [B, S], idx_k [B, S, Di] | None,
    S = Sq packed slots then Sw window slots."""

    def __init__(
        self,
        kp: PackedKV,
        vp: PackedKV,
        packed_pos: torch.Tensor,
        k_win: torch.Tensor | None,
        v_win: torch.Tensor | None,
        win_pos: torch.Tensor | None,
        idx_k: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        """kp, vp: Sq packed slots; packed_pos [B, Sq]; k_win, v_win [B, Sw, Hkv, Dh] | None; win_pos [B, Sw]."""
        self.kp, self.vp, self.packed_pos = kp, vp, packed_pos
        self.k_win, self.v_win, self.win_pos = k_win, v_win, win_pos
        self.idx_k, self.dtype = idx_k, dtype
        self.pos = _cat(packed_pos, win_pos)

    @cached_property
    def k(self) -> torch.Tensor:
        return _cat(unpack_dequantize(self.kp, self.dtype), self.k_win)

    @cached_property
    def v(self) -> torch.Tensor:
        return _cat(unpack_dequantize(self.vp, self.dtype), self.v_win)

    @property
    def materialized(self) -> bool:
        """Whether k or v has been dequantized (tests check the decode path never does)."""
        return "k" in self.__dict__ or "v" in self.__dict__

    def fused_attend(self, q: torch.Tensor, q_pos: torch.Tensor, scale: float | None = None) -> torch.Tensor | None:
        """q [B, 1, H, Dh], q_pos [B, 1] -> [B, 1, H, Dh] straight from the codes; None when this is not a
        one-token step or the device has no fast path (the caller then attends k and v as tensors)."""
        if q.shape[1] != 1 or not has_fast_path(q):
            return None
        return decode_attention(
            q, self.kp, self.vp, self.packed_pos, self.k_win, self.v_win, self.win_pos, q_pos, scale
        )
