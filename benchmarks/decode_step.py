"""One decode step of SmolLM2-135M at a long context: full cache vs a packed KVTuner cache, in one run.

The packed cache is run two ways in the same process: attending its codes (the serving path,
workers.caches.packed_view, compiled CPU kernel) and read as tensors (every packed token
dequantized each step, forced by a no-op observer, which is what every step cost before). Rows
alternate the arms step by step, so a load change on the shared machine hits all of them alike.

    python -m benchmarks.decode_step                                  # context 2048, batch 1 and 4
    python -m benchmarks.decode_step --context 512 2048 --batch 1 --steps 8
    python -m benchmarks.decode_step --kv-precision kv_precision.json --kv-budget 3.25 --maps searched
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from kernels.decode_attention import has_fast_path
from workers.caches.batch import BatchCache
from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache
from workers.caches.quantized import make_cache
from workers.model.hf.address import load_hf

MAPS = ("K8V4", "K4V2", "KV2")  # uniform KIVI maps (G = 32, R = 128), the searched maps' ingredients


def _no_observer(*args) -> None:
    """An observer that reads nothing but makes the attention read the cache as tensors."""


def _prefilled(model, make, context: int, batch: int, seed: int):
    """`batch` caches, each prefilled with `context` random tokens; returns the batch cache."""
    g = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(batch):
        cache = make()
        with torch.inference_mode():
            model(torch.randint(0, model.cfg.vocab_size, (1, context), generator=g), cache=cache)
        caches.append(cache)
    return BatchCache(caches) if batch > 1 else caches[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model address (shipped name or hf:<dir>)")
    p.add_argument("--context", type=int, nargs="+", default=[2048], help="tokens in each cache before decoding")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="requests decoded together")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per arm (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: one per CPU core)")
    p.add_argument("--kv-precision", default=None, help="a kv_precision.json (or run id): adds its map as 'searched'")
    p.add_argument("--kv-budget", type=float, default=None, help="which map of --kv-precision, in equivalent bits")
    p.add_argument("--maps", nargs="+", default=list(MAPS), help=f"maps to time: of {MAPS} and 'searched'")
    args = p.parse_args()
    unknown = [m for m in args.maps if m not in (*MAPS, "searched")]
    if unknown:
        p.error(f"--maps {unknown[0]!r}: one of {MAPS} or 'searched'")
    if "searched" in args.maps and args.kv_precision is None:
        p.error("--maps searched: needs --kv-precision")
    if min(args.context) < 160 or min(args.batch) < 1 or args.steps < 1:
        p.error(
            f"--context must be >= 160 (R + G), --batch and --steps >= 1; got {args.context}/{args.batch}/{args.steps}"
        )
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    searched = None
    if "searched" in args.maps:  # read before the model loads: a bad file fails at once
        from workers.kvtuner.artifact import load_config

        try:
            searched = load_config(args.kv_precision, args.kv_budget)  # with its own G, R and mode
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--kv-precision {args.kv_precision}: {e}")
    model = load_hf(args.model)
    n = model.cfg.n_layers
    configs = {m: KVQuantConfig.uniform(m, n, mode="kivi", group=32, residual=128) for m in args.maps if m in MAPS}
    if searched is not None:
        try:
            searched.check_model(n)
        except ValueError as e:
            p.error(f"--kv-precision {args.kv_precision}: {e}")
        configs["searched"] = searched
    fast = has_fast_path(torch.zeros(1))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; compiled decode kernel: {fast}\n")  # fmt: skip
    print("| context | batch | map | full (ms/step) | packed, codes (ms/step) | packed, as tensors (ms/step) "
          "| codes / full tokens/s | codes vs as tensors |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for context in args.context:
        for batch in args.batch:
            for name, qc in configs.items():
                arms = {
                    "full": (_prefilled(model, lambda: DynamicCache(n), context, batch, 0), None),
                    "codes": (_prefilled(model, lambda qc=qc: make_cache(qc, n, "packed"), context, batch, 0), None),
                    "tensors": (
                        _prefilled(model, lambda qc=qc: make_cache(qc, n, "packed"), context, batch, 0),
                        _no_observer,
                    ),
                }
                times = {a: [] for a in arms}
                tok = torch.zeros(batch, 1, dtype=torch.long)
                for step in range(args.steps + 1):  # step 0 warms up
                    for arm, (cache, observer) in arms.items():
                        pos = torch.full((batch, 1), context + step)
                        t0 = time.perf_counter()
                        with torch.inference_mode():
                            model(tok, positions=pos, cache=cache, observer=observer)
                        if step:
                            times[arm].append(time.perf_counter() - t0)
                ms = {a: 1e3 * statistics.median(t) for a, t in times.items()}
                print(f"| {context} | {batch} | {name} | {ms['full']:.1f} | {ms['codes']:.1f} | {ms['tensors']:.1f} "
                      f"| {ms['full'] / ms['codes']:.2f}x | {ms['tensors'] / ms['codes']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
