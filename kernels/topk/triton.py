"""Deterministic top-k in Triton: one program per row, a running top-KP buffer of sort keys.

Each score is turned into one int64 sort key, high word = the float's bits mapped to a
signed order-preserving int, low word = 2^31 - 1 - index, so a descending sort orders by
(score desc, index asc) and ties need no special case. The row is scanned in blocks of KP
(next power of two >= k): a block sorted ascending against the buffer sorted descending,
element-wise max keeps exactly the top KP of both (the bitonic merge step), then re-sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keys(x_ptr, offs, S):
    x = tl.load(x_ptr + offs, mask=offs < S, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)  # NaN is never selected, like -inf
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in torch
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving for negatives
    key = (bits.to(tl.int64) << 32) + (2147483647 - offs).to(tl.int64)  # low word: 2^31 - 1 - index
    return tl.where(offs < S, key, -9223372036854775807 - 1)


@triton.jit
def _topk_kernel(x_ptr, o_ptr, S, K, NEG_INF_KEY, sx_r, so_r, KP: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.arange(0, KP)
    buf = tl.sort(_keys(x_ptr + r * sx_r, offs, S), descending=True)
    for s0 in range(KP, S, KP):
        blk = tl.sort(_keys(x_ptr + r * sx_r, s0 + offs, S), descending=False)
        buf = tl.sort(tl.maximum(buf, blk), descending=True)
    hi = buf >> 32
    idx = 2147483647 - (buf & 0xFFFFFFFF)
    idx = tl.where(hi > NEG_INF_KEY, idx, -1)
    tl.store(o_ptr + r * so_r + offs, idx, mask=offs < K)


def _neg_inf_key() -> int:
    """The int32 sort key of -inf (the bit mapping in _keys, done on the host)."""
    bits = torch.tensor([float("-inf")], dtype=torch.float32).view(torch.int32).item()
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [B, T, S] -> [B, T, K] int64 (descending, ties lowest index, -1 padding)."""
    b, t, s = logits.shape
    x = logits.reshape(b * t, s)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(b * t, k, dtype=torch.int64, device=logits.device)
    if b * t == 0:
        return out.view(b, t, k)
    kp = max(16, triton.next_power_of_2(k))
    _topk_kernel[(b * t,)](x, out, s, k, _neg_inf_key(), x.stride(0), out.stride(0), KP=kp)
    return out.view(b, t, k)
