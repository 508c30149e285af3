"""Decode attention over packed KV + window: reference vs dense on dequantized KV, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_dense
from kernels.decode_attention.reference import decode_attention as reference
from kernels.kv_quant import quantize_pack, unpack_dequantize
from tests.kernels._util import assert_close


def _cache(k_bits, v_bits, b=2, sq=64, w=5, h=4, hkv=2, dh=48, t=2, mode="kivi", seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, sq, hkv, dh, generator=g), torch.randn(b, sq, hkv, dh, generator=g)
    kp, vp = quantize_pack(k, k_bits, mode, "k", 32), quantize_pack(v, v_bits, mode, "v", 32)
    pos = torch.arange(sq).expand(b, sq).clone()
    pos[-1, sq - 7 :] = -1  # unfilled capacity in the last batch row
    k_win, v_win = torch.randn(b, w, hkv, dh, generator=g), torch.randn(b, w, hkv, dh, generator=g)
    win_pos = torch.arange(sq, sq + w).expand(b, w).clone()
    q = torch.randn(b, t, h, dh, generator=g)
    q_pos = torch.tensor([[sq + w - 2, sq + w - 1]] * b)[:, :t]  # causal inside the window too
    return q, kp, vp, pos, k_win, v_win, win_pos, q_pos


def _dense(q, kp, vp, pos, k_win, v_win, win_pos, q_pos):
    k = torch.cat([unpack_dequantize(kp), k_win], 1)
    v = torch.cat([unpack_dequantize(vp), v_win], 1)
    return decode_attention_dense(q, k, v, torch.cat([pos, win_pos], 1), q_pos)


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (4, 2), (8, 4)])
@pytest.mark.parametrize("block", [16, 1024])
def test_reference_split_k_equals_dense_on_dequantized(k_bits, v_bits, block):
    args = _cache(k_bits, v_bits)
    assert_close("out", reference(*args, block=block), _dense(*args), 1e-6)


def test_quantization_error_shrinks_with_bits():
    args = _cache(2, 2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 64, 2, 48, generator=g), torch.randn(2, 64, 2, 48, generator=g)
    full = decode_attention_dense(args[0], torch.cat([k, args[4]], 1), torch.cat([v, args[5]], 1),
                                  torch.cat([args[3], args[6]], 1), args[7])  # fmt: skip
    errs = [(reference(*_cache(b, b)) - full).pow(2).mean() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_no_window_and_nothing_visible():
    q, kp, vp, pos, *_ = _cache(4, 4)
    q_pos = torch.full((2, 2), -1)
    out = reference(q, kp, vp, pos, None, None, None, q_pos)
    assert out.abs().sum() == 0


@pytest.mark.parametrize("k_bits,v_bits,mode", [(4, 2, "kivi"), (8, 8, "per_token"), (2, 4, "kivi")])
def test_triton_matches_reference(force_triton, k_bits, v_bits, mode):
    args = _cache(k_bits, v_bits, b=1, mode=mode, seed=k_bits)
    assert_close("out", decode_attention(*args), reference(*args), 1e-5)


@pytest.mark.parametrize("k_bits,v_bits,mode,dh", [(4, 2, "kivi", 48), (8, 2, "per_token", 20)])
def test_cpu_kernel_matches_reference(k_bits, v_bits, mode, dh):
    """The compiled CPU path (one kivi pair; per_token with a partly filled last code word)."""
    from kernels.decode_attention import cpu

    assert cpu.available(), "the CPU decode kernel did not build (see kernels/decode_attention/cpu.py)"
    args = _cache(k_bits, v_bits, b=2, t=1, dh=dh, mode=mode, seed=k_bits + dh)
    assert_close("out", cpu.decode_attention(*args), reference(*args), 1e-5)
    no_window = (*args[:4], None, None, None, args[7])
    assert_close("out", cpu.decode_attention(*no_window), reference(*no_window), 1e-5)


def test_without_a_compiler_the_reference_path_serves(tmp_path):
    """No C++ compiler: one warning, no fast path, decode_attention is the reference, a packed view
    is read as tensors. In a fresh process, since the build is attempted once per process."""
    import subprocess
    import sys

    code = (
        "import torch, logging; logging.basicConfig()\n"
        "from kernels.decode_attention import cpu, decode_attention, has_fast_path\n"
        "from kernels.decode_attention.reference import decode_attention as ref\n"
        "from tests.kernels.test_decode_attention import _cache\n"
        "assert not cpu.available() and not has_fast_path(torch.zeros(1))\n"
        "args = _cache(4, 2, t=1)\n"
        "assert torch.equal(decode_attention(*args), ref(*args))\n"
        "print('fallback ok')\n"
    )
    env = {**__import__("os").environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("CALIBRAY_FORCE_TRITON", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stderr[-3000:]
    assert "did not build" in r.stderr
