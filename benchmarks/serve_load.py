"""Load test of the serving application on loopback: full vs calibrated caches in one KV budget.

    python -m benchmarks.serve_load --model smollm2-135m \\
        --kv-precision d05370b24cfa46358ac33d25bfbe62b3 --kv-budget 3.0 \\
        --prefixkv 3443003532e54778b577e450efc117f1 --keep-ratio 0.5          # docs/SERVING.md
    python -m benchmarks.serve_load --model hf:<dir> --context 256 --max-tokens 8 --concurrency 1 4   # smoke

Every deployment is one replica of the same model with the same CPUs and the same KV-cache byte
budget per replica (`--budget-seqs` full-cache sequences of `--context` tokens, measured on the
full cache as serve.admission measures every reservation):
  full              full-precision cache, batched
  full-unbatched    full-precision cache, one request at a time (only at `--unbatched-at` levels)
  kvtuner           the KVTuner precision map (`--kv-precision`, `--kv-budget` picks the map)
  kvtuner-prefixkv  that map with PrefixKV budgets (`--prefixkv`, `--keep-ratio`) as well
At each concurrency level c, c clients each stream one request (prompt of context - max_tokens
tokens, a distinct held-out window of the stdlib corpus in the model's tokens; greedy;
max_tokens fixed). The modes take turns at each level, so a machine whose load drifts biases no
mode in particular. Reported per mode and level: requests admitted together (the replica's peak),
completion tokens/s over the level's wall time, time to first token (queueing + prefill), decode
ms per output token (after the first), KV bytes per request; then each mode's ratio to `full`.
As an outside reference for single-request latency, transformers' own `generate` (greedy, same
prompt, same thread count) runs in the driver. Results go to MLflow (pipeline serve_load) and
print as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from workers.runtime import cli


def stream_one(url: str, body: dict, timeout: float) -> dict:
    """One streamed completion -> {ttft_s, total_s, tokens, tpot_s, kv_bytes}."""
    t0 = time.perf_counter()
    first = None
    usage = None
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    n = usage["completion_tokens"]
    return {
        "ttft_s": (first or end) - t0,
        "total_s": end - t0,
        "tokens": n,
        "tpot_s": (end - (first or end)) / max(n - 1, 1),
        "kv_bytes": usage.get("kv_cache_bytes", 0),
    }


def run_level(url: str, prompts: list[list[int]], max_tokens: int, timeout: float) -> dict:
    """len(prompts) concurrent clients, one streamed request each."""

    def one(ids: list[int]) -> dict:
        body = {
            "model": "bench",
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return stream_one(url, body, timeout)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        res = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    return {
        "requests": len(res),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in res) / wall,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in res),
        "ttft_max_s": max(r["ttft_s"] for r in res),
        "latency_p50_s": statistics.median(r["total_s"] for r in res),
        "tpot_ms": 1000 * statistics.mean(r["tpot_s"] for r in res),
        "kv_bytes_mean": statistics.mean(r["kv_bytes"] for r in res),
    }


def hf_generate_latency(model_address: str, prompt: list[int], max_tokens: int, threads: int) -> float:
    """Seconds for transformers' own greedy `generate` of max_tokens after the prompt (best of 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.model.hf.address import config_file

    torch.set_num_threads(threads)
    # Plain transformers, not calibray's bridge: the reference is what a user gets without calibray.
    hf = AutoModelForCausalLM.from_pretrained(
        config_file(model_address).parent, dtype=torch.float32, local_files_only=True
    ).eval()
    ids = torch.tensor([prompt])
    times = []
    with torch.inference_mode():
        for _ in range(2):
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            times.append(time.perf_counter() - t0)
    return min(times)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="any model address (smollm2-135m, hf:<dir>, runs:/...)")
    p.add_argument("--kv-precision", default=None, help="kv_precision.json or run id (the kvtuner modes)")
    p.add_argument("--kv-budget", type=float, default=None, help="which KVTuner map, in equivalent bits")
    p.add_argument("--prefixkv", default=None, help="prefixkv.json or run id (the kvtuner-prefixkv mode)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="PrefixKV keep ratio")
    p.add_argument("--context", type=int, default=2048, help="prompt + max_tokens per request, in tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--budget-seqs", type=float, default=4, help="KV budget: this many full-cache sequences")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client concurrency levels")
    p.add_argument("--unbatched-at", type=int, nargs="*", default=[16], help="levels that also run unbatched")
    p.add_argument("--max-batch-size", type=int, default=16, help="batch limit of the batched modes")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per model replica")
    p.add_argument("--torch-threads", type=int, default=2, help="torch threads in each replica (and HF generate)")
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--time-limit", type=float, default=3600.0, help="stop starting new levels after this")
    a = p.parse_args(argv)
    if a.max_tokens < 2 or a.context <= a.max_tokens:
        raise ValueError(f"--context {a.context} --max-tokens {a.max_tokens}: need 2 <= max_tokens < context")
    if a.budget_seqs <= 0:
        raise ValueError(f"--budget-seqs {a.budget_seqs}: must be > 0")
    if a.prefixkv is not None and a.kv_precision is None:
        raise ValueError("--prefixkv: the kvtuner-prefixkv mode needs --kv-precision too")
    if any(c < 1 for c in a.concurrency):
        raise ValueError(f"--concurrency {a.concurrency}: levels must be >= 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    from serve.app import build
    from serve.config import ServeArgs

    modes = ["full"] + (["kvtuner"] if a.kv_precision else []) + (["kvtuner-prefixkv"] if a.prefixkv else [])
    common = dict(
        model=a.model,
        name="bench",
        replica_cpus=a.replica_cpus,
        torch_threads=a.torch_threads,
        max_ongoing_requests=max(a.concurrency) * 2,
        max_tokens_limit=a.max_tokens,
        max_context=a.context,
    )
    cal = {
        "full": {},
        "kvtuner": {"kv_precision": a.kv_precision, "kv_budget": a.kv_budget},
        "kvtuner-prefixkv": {
            "kv_precision": a.kv_precision,
            "kv_budget": a.kv_budget,
            "prefixkv": a.prefixkv,
            "keep_ratio": a.keep_ratio,
        },
    }
    budget = full_cache_bytes(a.model, a.context, a.budget_seqs)
    args = {m: ServeArgs(**common, **cal[m], max_batch_size=a.max_batch_size, kv_cache_bytes=budget) for m in modes}
    if a.unbatched_at:
        args["full-unbatched"] = ServeArgs(**common, max_batch_size=1, kv_cache_bytes=budget)
    apps = {m: build(x) for m, x in args.items()}  # every calibration resolved before Ray starts
    prompts = heldout_prompts(a.model, a.context - a.max_tokens, max(a.concurrency))
    cli.work_started()  # model, calibrations and prompts checked: errors from here on are the benchmark's
    run(a, apps, budget, prompts)


def full_cache_bytes(model: str, context: int, seqs: float) -> int:
    """The KV budget: `seqs` x what one full-cache sequence of `context` tokens reserves, in the dtype
    the replica serves in (workers.model.hf.address.load_any: HF models bf16 on GPU, else fp32)."""
    import torch

    from serve.admission import KVReservations, KVShape
    from workers.caches.protocol import DynamicCache
    from workers.model.hf.address import describe, resolve_dtype

    d = describe(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as serve.model_server picks it
    dtype = torch.float32 if d.model_type == "calib" else resolve_dtype(None, device)
    shape = KVShape(d.n_layers, d.n_kv_heads, d.head_dim, dtype)
    return int(seqs * KVReservations(lambda: DynamicCache(d.n_layers), shape)(context))


def heldout_prompts(model: str, n_tokens: int, n: int) -> list[list[int]]:
    """n distinct windows of n_tokens from the stdlib corpus' held-out split, in the model's tokens."""
    from workers.data.corpus import load_corpus
    from workers.model.hf.address import load_tokenizer

    windows = load_corpus("stdlib").eval_windows("heldout", n_tokens, n, load_tokenizer(model))
    if windows.shape[0] < n:
        raise ValueError(f"the stdlib held-out split has only {windows.shape[0]} windows of {n_tokens} tokens")
    return windows.tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a: argparse.Namespace, apps: dict, budget: int, prompts: list[list[int]]) -> None:
    import mlflow
    import ray
    from ray import serve

    from workers.runtime import tracking
    from workers.runtime.cluster import init_ray

    # The deployments take turns, so their reservations may add up past the machine's cores.
    init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(len(apps) * (a.replica_cpus + 0.1)) + 1))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    params = {**vars(a), "kv_cache_bytes": budget, "modes": ",".join(apps)}
    t_start, rows = time.time(), []
    with tracking.start_run("serve_load", run_name="serve_load", params=params) as mrun:
        for mode, app in apps.items():
            serve.run(app, name=mode, route_prefix=f"/{mode}")
            # Warm-up at full length: the replica measures this length's KV reservation (serve.admission)
            # and runs its first long prefill before anything is timed.
            run_level(f"{url}/{mode}", [prompts[0]], 2, a.request_timeout)
        for c in a.concurrency:
            for mode in apps:
                if mode == "full-unbatched" and c not in a.unbatched_at:
                    continue
                if time.time() - t_start > a.time_limit:
                    print(f"time limit reached; skipping {mode} at concurrency {c}", flush=True)
                    continue
                row = {
                    "mode": mode,
                    "concurrency": c,
                    **run_level(f"{url}/{mode}", prompts[:c], a.max_tokens, a.request_timeout),
                }
                # The replica's peak so far; levels rise, so it is this level's.
                handle = serve.get_deployment_handle("Model", app_name=mode)
                row["peak_active"] = handle.info.remote().result()["stats"]["peak_active"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                mlflow.log_metrics({f"{mode}/c{c}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        serve.shutdown()
        ray.shutdown()
        hf_s = hf_generate_latency(a.model, prompts[0], a.max_tokens, a.torch_threads)
        mlflow.log_metric("hf_generate/c1/latency_s", hf_s)
        table = report(rows, hf_s, budget, a)
        mlflow.log_text(table, "serve_load.md")
        mlflow.log_text(json.dumps(rows, indent=1), "serve_load.json")
        print(table)
        print(f"MLflow run: {mrun.info.run_id}")


def report(rows: list[dict], hf_s: float, budget: int, a: argparse.Namespace) -> str:
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    out = [
        f"KV budget {budget} bytes per replica ({a.budget_seqs:g} full-cache sequences of {a.context} tokens); "
        f"prompts of {a.context - a.max_tokens} tokens, {a.max_tokens} completion tokens, greedy.",
        "",
        "| mode | concurrency | admitted together | tokens/s | TTFT p50 s | TTFT max s | decode ms/token | KV bytes/request |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['concurrency']} | {r['peak_active']} | {r['tokens_per_s']:.2f} | "
            f"{r['ttft_p50_s']:.1f} | {r['ttft_max_s']:.1f} | {r['tpot_ms']:.0f} | {r['kv_bytes_mean']:.3g} |"
        )
    out += ["", "| mode / full | concurrency | admitted | tokens/s | decode speed (1/ms per token) | KV bytes |"]
    out.append("| --- | --- | --- | --- | --- | --- |")
    for (mode, c), r in by.items():
        f = by.get(("full", c))
        if mode == "full" or f is None:
            continue
        out.append(
            f"| {mode} | {c} | {r['peak_active'] / f['peak_active']:.2f} | {r['tokens_per_s'] / f['tokens_per_s']:.2f} "
            f"| {f['tpot_ms'] / r['tpot_ms']:.2f} | {r['kv_bytes_mean'] / f['kv_bytes_mean']:.2f} |"
        )
    single = by.get(("full", 1))
    if single:
        out += [
            "",
            f"Single request, full cache: served {single['latency_p50_s']:.2f} s against transformers' "
            f"`generate` {hf_s:.2f} s in the driver (ratio {single['latency_p50_s'] / hf_s:.2f}).",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    cli.run(main)
