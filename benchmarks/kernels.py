"""Kernel benchmarks: ratios measured in one run, logged to MLflow, printed as a markdown table.

CPU (always): our reference paths against the naive PyTorch formulations
  - sparse attention (gather + masked softmax over k = 256 indices) vs dense causal attention
    (naive einsum + softmax, and torch's fused scaled_dot_product_attention) at L = 2048, 8192;
  - packed-KV decode (KIVI, 8/4/2 bits) vs full-precision decode over the same cache, the
    reference and the compiled CPU kernel (against SDPA, and against dequantize + SDPA);
  - indexer logits chunked vs naive (time and largest intermediate).
GPU (only when CUDA is present): each Triton kernel against its reference, and against the
card's measured copy bandwidth (memory-bound kernels) or bf16 matmul throughput.

    python -m benchmarks.kernels                       # CPU table (a few minutes on 2 cores)
    python -m benchmarks.kernels --lengths 2048 --repeats 3
    python -m benchmarks.kernels --gpu-smoke           # GPU section on CPU via TRITON_INTERPRET, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.attention_received.reference import attention_received as received_ref
from kernels.decode_attention import cpu as decode_cpu
from kernels.decode_attention.reference import decode_attention as decode_ref
from kernels.decode_attention.reference import decode_attention_dense
from kernels.indexer_logits.reference import indexer_logits as indexer_ref
from kernels.indexer_logits.reference import indexer_logits_naive
from kernels.kv_quant.reference import quantize_pack as quant_ref
from kernels.kv_quant.reference import unpack_dequantize as dequant_ref
from kernels.sparse_attention.reference import causal_attention, sparse_attention
from kernels.topk.reference import topk_indices


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(fn: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Median wall seconds of `repeats` calls after one warm-up call."""
    fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def bench_pair(
    ours: Callable[[], object], base: Callable[[], object], repeats: int, device: str = "cpu"
) -> tuple[float, float]:
    """Medians of alternating calls, so a load change on a shared machine hits both sides alike."""
    ours(), base()
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_ours.append(_timed(ours, device))
        t_base.append(_timed(base, device))
    return statistics.median(t_ours), statistics.median(t_base)


def _causal_idx(b: int, t: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Top-k of random causal scores: the index set a trained indexer would hand over, [B, T, K]."""
    out = torch.empty(b, t, k, dtype=torch.int64)
    for t0 in range(0, t, 512):
        t1 = min(t, t0 + 512)
        sc = torch.rand(b, t1 - t0, t, generator=g)
        sc = sc.masked_fill(torch.arange(t)[None, None, :] > torch.arange(t0, t1)[None, :, None], float("-inf"))
        out[:, t0:t1] = topk_indices(sc, k)
    return out


def cpu_attention(rows: list, lengths: list[int], k: int, repeats: int) -> None:
    for L in lengths:
        _attention_rows(rows, L, k, repeats)


def _attention_rows(rows: list, L: int, k: int, repeats: int) -> None:
    b, h, hkv, dh = 1, 2, 1, 64
    g = torch.Generator().manual_seed(L)
    q, kk, v = (torch.randn(b, L, n, dh, generator=g) for n in (h, hkv, hkv))
    idx = _causal_idx(b, L, k, g)
    pos = torch.arange(L)[None]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, kk, v))
    with torch.no_grad():
        sparse = lambda: sparse_attention(q, kk, v, idx)
        t_sparse, t_dense = bench_pair(sparse, lambda: causal_attention(q, kk, v, pos, pos), repeats)
        sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        t_sparse2, t_sdpa = bench_pair(sparse, sdpa, repeats)
    shape = f"L={L} k={k} H={h} Hkv={hkv} Dh={dh}"
    rows.append(("sparse attention (reference) vs naive dense causal", shape, t_sparse, t_dense))
    rows.append(("sparse attention (reference) vs torch SDPA causal", shape, t_sparse2, t_sdpa))


def cpu_decode(rows: list, s: int, repeats: int) -> None:
    b, h, hkv, dh, w = 1, 8, 2, 64, 32
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, s, hkv, dh, generator=g), torch.randn(b, s, hkv, dh, generator=g)
    k_win, v_win = torch.randn(b, w, hkv, dh, generator=g), torch.randn(b, w, hkv, dh, generator=g)
    q = torch.randn(b, 1, h, dh, generator=g)
    pos, win_pos, q_pos = torch.arange(s)[None], torch.arange(s, s + w)[None], torch.tensor([[s + w - 1]])
    k_full, v_full, pos_full = torch.cat([k, k_win], 1), torch.cat([v, v_win], 1), torch.cat([pos, win_pos], 1)
    full = lambda: decode_attention_dense(q, k_full, v_full, pos_full, q_pos)
    sdpa = lambda: _sdpa(q, k_full, v_full)
    fp16_bytes = 2 * (s + w) * hkv * dh * 2
    for kb, vb in [(8, 8), (4, 4), (4, 2), (2, 2)]:
        kp, vp = quant_ref(k, kb, "kivi", "k", 32), quant_ref(v, vb, "kivi", "v", 32)
        packed = lambda kp=kp, vp=vp: decode_ref(q, kp, vp, pos, k_win, v_win, win_pos, q_pos)
        t_packed, t_full = bench_pair(packed, full, repeats)
        held = kp.nbytes() + vp.nbytes() + 2 * w * hkv * dh * 2
        shape = f"S={s}+{w} H={h} Hkv={hkv} Dh={dh} K{kb}V{vb} kivi; bytes {held / fp16_bytes:.2f}x of fp16"
        rows.append(("packed-KV decode (reference) vs full-precision decode", shape, t_packed, t_full))
        if not decode_cpu.available():
            continue
        # What serving runs: the compiled kernel against full-precision SDPA (the model's own
        # attention) and against reading the packed cache as tensors first (dequantize, then SDPA).
        fused = lambda kp=kp, vp=vp: decode_cpu.decode_attention(q, kp, vp, pos, k_win, v_win, win_pos, q_pos)
        rows.append(
            ("packed-KV decode (compiled CPU) vs full-precision SDPA", shape, *bench_pair(fused, sdpa, repeats))
        )
        read = lambda kp=kp, vp=vp: _sdpa(
            q, torch.cat([dequant_ref(kp), k_win], 1), torch.cat([dequant_ref(vp), v_win], 1)
        )
        rows.append(("packed-KV decode (compiled CPU) vs dequantize + SDPA", shape, *bench_pair(fused, read, repeats)))


def _sdpa(q, k, v):
    """Decode attention as the models run it: q [B, 1, H, Dh], k/v [B, S, Hkv, Dh] (every key visible)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)


def largest_intermediate(fn: Callable[[], torch.Tensor]) -> int:
    """Largest storage (elements) any op allocates inside fn, its returned tensor excluded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes: list[tuple[int, int]] = []

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    sizes.append((st.data_ptr(), st.nbytes() // t.element_size()))
            return out

    with torch.no_grad(), Rec():
        res = fn()
    skip = res.untyped_storage().data_ptr()
    return max(n for p, n in sizes if p != skip)


def cpu_indexer(rows: list, lengths: list[int], repeats: int) -> None:
    for L in lengths:
        _indexer_row(rows, L, repeats)


def _indexer_row(rows: list, L: int, repeats: int) -> None:
    hi, di = 4, 32
    g = torch.Generator().manual_seed(L)
    q, k, w = torch.randn(1, L, hi, di, generator=g), torch.randn(1, L, di, generator=g), torch.randn(1, L, hi)
    pos = torch.arange(L)[None]
    with torch.no_grad():
        t_chunk, t_naive = bench_pair(
            lambda: indexer_ref(q, k, w, pos, pos), lambda: indexer_logits_naive(q, k, w, pos, pos), repeats
        )
    m_chunk = largest_intermediate(lambda: indexer_ref(q, k, w, pos, pos))
    m_naive = largest_intermediate(lambda: indexer_logits_naive(q, k, w, pos, pos))
    mem = f"largest intermediate {m_chunk / 2**20:.0f}M vs {m_naive / 2**20:.0f}M elements"
    rows.append(("indexer logits chunked (reference) vs naive", f"L={L} Hi={hi} Di={di}; {mem}", t_chunk, t_naive))


def gpu_section(rows: list, device: str, small: bool, repeats: int) -> dict[str, float]:
    """Triton vs reference per kernel on `device`; ceilings measured on the same device."""
    from kernels import attention_received, indexer_logits
    from kernels import sparse_attention as sparse_public
    from kernels import topk_indices as topk_public
    from kernels.decode_attention import decode_attention
    from kernels.kv_quant import quantize_pack, unpack_dequantize

    os.environ["CALIBRAY_FORCE_TRITON"] = "1"
    dt = torch.float32 if small else torch.bfloat16
    L, h, hkv, dh, k = (40, 4, 1, 32, 8) if small else (8192, 16, 4, 128, 256)
    S = 64 if small else 32768
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    ceilings = {}
    if device == "cuda":
        big = torch.empty(2**28, dtype=torch.float32, device=device)
        t = bench(lambda: big.clone(), repeats, device)
        ceilings["copy_GBps"] = 2 * big.numel() * 4 / t / 1e9
        a = rnd(8192, 8192, dtype=torch.bfloat16)
        t = bench(lambda: a @ a, repeats, device)
        ceilings["bf16_matmul_TFLOPs"] = 2 * 8192**3 / t / 1e12
        del big, a

    def add(name, shape, fn_triton, fn_ref, work=None):
        t_tri, t_ref = bench_pair(fn_triton, fn_ref, repeats, device)
        note = shape
        if work and ceilings:
            kind, amount = work
            if kind == "bytes":
                note += (
                    f"; {amount / t_tri / 1e9:.0f} GB/s = {amount / t_tri / 1e9 / ceilings['copy_GBps']:.0%} of copy"
                )
            else:
                tf = amount / t_tri / 1e12
                note += f"; {tf:.1f} TFLOP/s = {tf / ceilings['bf16_matmul_TFLOPs']:.0%} of bf16 matmul"
        rows.append((f"{name}: Triton vs reference ({device})", note, t_tri, t_ref))

    pos = torch.arange(L, device=device)[None]
    qi, ki, wi = rnd(1, L, 4, 64 if not small else 16), rnd(1, L, 64 if not small else 16), rnd(1, L, 4)
    add("indexer logits", f"L={L} Hi=4", lambda: indexer_logits(qi, ki, wi, pos, pos),
        lambda: indexer_ref(qi, ki, wi, pos, pos), ("flop", 2 * L * L * 4 * ki.shape[-1]))  # fmt: skip
    logits = indexer_ref(qi, ki, wi, pos, pos)
    add("top-k", f"L={L} k={k}", lambda: topk_public(logits, k), lambda: topk_indices(logits, k),
        ("bytes", logits.numel() * 4))  # fmt: skip
    idx = topk_indices(logits, k)
    q, kk, v = rnd(1, L, h, dh), rnd(1, L, hkv, dh), rnd(1, L, hkv, dh)
    add("sparse attention fwd", f"L={L} k={k} H={h} Hkv={hkv} Dh={dh}", lambda: sparse_public(q, kk, v, idx),
        lambda: sparse_attention(q, kk, v, idx), ("flop", 4 * L * h * k * dh))  # fmt: skip
    add("attention received", f"L={L} H={h}", lambda: attention_received(q, kk, pos, pos),
        lambda: received_ref(q, kk, pos, pos), ("flop", 2 * 2 * L * L * h * dh))  # fmt: skip
    kc, vc = rnd(1, S, hkv, dh), rnd(1, S, hkv, dh)
    add("kv quantize+pack 4-bit kivi", f"S={S} Hkv={hkv} Dh={dh}", lambda: quantize_pack(kc, 4, "kivi", "k", 32),
        lambda: quant_ref(kc, 4, "kivi", "k", 32), ("bytes", kc.numel() * kc.element_size()))  # fmt: skip
    kp, vp = quant_ref(kc, 4, "kivi", "k", 32), quant_ref(vc, 2, "kivi", "v", 32)
    add("kv unpack+dequantize 4-bit", f"S={S}", lambda: unpack_dequantize(kp, dt), lambda: dequant_ref(kp, dt),
        ("bytes", kp.nbytes() + kc.numel() * kc.element_size()))  # fmt: skip
    qd, ppos, qpos = rnd(1, 1, h, dh), torch.arange(S, device=device)[None], torch.tensor([[S]], device=device)
    add("decode attention K4V2", f"S={S} H={h} Hkv={hkv} Dh={dh}",
        lambda: decode_attention(qd, kp, vp, ppos, None, None, None, qpos),
        lambda: decode_ref(qd, kp, vp, ppos, None, None, None, qpos), ("bytes", kp.nbytes() + vp.nbytes()))  # fmt: skip
    os.environ.pop("CALIBRAY_FORCE_TRITON", None)
    return ceilings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="sequence lengths L for attention")
    p.add_argument("--topk", type=int, default=256, help="indices per query k for sparse attention")
    p.add_argument("--indexer-lengths", type=int, nargs="+", default=[2048, 4096], help="L for the indexer rows")
    p.add_argument("--decode-length", type=int, default=8192, help="cache length S for the decode rows")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=["attention", "decode", "indexer"],
        default=["attention", "decode", "indexer"],
        help="which CPU comparisons to run",
    )
    p.add_argument("--gpu-smoke", action="store_true", help="run the GPU section on CPU at tiny shapes (interpreter)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: one per CPU core)")
    p.add_argument("--no-mlflow", action="store_true", help="print only; do not log an MLflow run")
    p.add_argument("--out", default="artifacts/bench_kernels.json", help="where to write the JSON results")
    args = p.parse_args()
    for name in ("lengths", "indexer_lengths"):
        if any(v < 16 for v in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} values must be >= 16, got {getattr(args, name)}")
    if args.topk < 1 or args.repeats < 1 or args.decode_length < 32:
        p.error(
            f"--topk/--repeats must be >= 1 and --decode-length >= 32, got {args.topk}/{args.repeats}/{args.decode_length}"
        )

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    rows: list[tuple[str, str, float, float]] = []
    ceilings: dict[str, float] = {}
    if args.gpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        ceilings = gpu_section(rows, "cpu", small=True, repeats=1)
    else:
        if "attention" in args.sections:
            cpu_attention(rows, args.lengths, args.topk, args.repeats)
        if "decode" in args.sections:
            cpu_decode(rows, args.decode_length, args.repeats)
        if "indexer" in args.sections:
            cpu_indexer(rows, args.indexer_lengths, args.repeats)
        if torch.cuda.is_available():
            ceilings = gpu_section(rows, "cuda", small=False, repeats=args.repeats)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    machine += f", {torch.get_num_threads()} intra-op threads"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    print(f"machine: {machine}\n")
    print("| comparison | shape | ours (s) | baseline (s) | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for name, shape, ours, base in rows:
        print(f"| {name} | {shape} | {ours:.4f} | {base:.4f} | {base / ours:.2f}x |")
    for k, v in ceilings.items():
        print(f"\nceiling {k}: {v:.1f}")
    result = {"machine": machine, "rows": rows, "ceilings": ceilings, "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if not args.no_mlflow:
        from workers.runtime import tracking

        with tracking.start_run("bench_kernels", params={**vars(args), "machine": machine}) as run:
            metrics = {f"speedup_{i:02d}": base / ours for i, (_, _, ours, base) in enumerate(rows)}
            tracking.log_metrics({**metrics, **ceilings})
            import mlflow

            mlflow.log_artifact(args.out)
            print(f"\nMLflow run id: {run.info.run_id}")


if __name__ == "__main__":
    main()
