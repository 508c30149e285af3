"""Load test of the serving application on loopback: batched vs unbatched, calibrated vs full cache.

    python -m benchmarks.serve_load --model runs:/<run_id>/model              # the demo model
    python -m benchmarks.serve_load --preset demo --requests-per-level 32      # untrained demo shape
    python -m benchmarks.serve_load --preset tiny --concurrency 1 4 --max-tokens 8   # smoke run

Three deployments of the same model, up at the same time, each one replica with the same CPUs;
at each concurrency level the three take turns (so load drift on a shared machine hits all):
  full-batched    full-precision cache, up to --max-batch-size requests decoded together
  full-unbatched  full-precision cache, one request at a time (max_batch_size=1)
  calibrated      batched, with the calibrated configs given (default when none are: KV4 KIVI
                  cache and PrefixKV keep 0.5 with uniform per-layer fractions)
For each concurrency level, `--requests-per-level` requests (fixed prompt length, greedy, fixed
max_tokens) are sent by that many client threads; reported: completion tokens/s, p50/p99 request
latency, mean KV bytes per request; then the ratios batched/unbatched and calibrated/full at each
level. Everything is bounded: a per-request timeout and a total time limit. Results are logged to
MLflow (pipeline tag serve_load) and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from workers.runtime import cli

MODES = ("full-batched", "full-unbatched", "calibrated")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_calibration(n_layers: int, out_dir: Path) -> dict[str, str]:
    """Uniform KV4 (KIVI, G=32, R=32) and PrefixKV keep 0.5 with uniform fractions, as JSON files."""
    kv = {
        "method": "uniform",
        "mode": "kivi",
        "group_size": 32,
        "residual": 32,
        "layers": [{"layer": i, "k_bits": 4, "v_bits": 4} for i in range(n_layers)],
    }
    pkv = {
        "version": 1,
        "model": "uniform",
        "n_layers": n_layers,
        "n_sink": 4,
        "context": 0,
        "samples": 0,
        "ratios": [0.5],
        "default_score": "sum",
        "window": 32,
        "scores": {"sum": {"fractions": [[0.5] * n_layers]}},
    }
    paths = {}
    for name, body in (("kv_precision", kv), ("prefixkv", pkv)):
        paths[name] = str(out_dir / f"{name}.json")
        Path(paths[name]).write_text(json.dumps(body))
    return paths


def prompt_text(n_tokens: int) -> str:
    from workers.data.corpus import load_corpus

    text = load_corpus().heldout.decode("utf-8", errors="ignore").encode("ascii", errors="ignore").decode()
    return text[:n_tokens]


def run_level(url: str, body: dict, concurrency: int, n_requests: int, timeout: float) -> dict:
    def one(i: int) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/completions", json={**body, "seed": i}, timeout=timeout)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat = sorted(x[0] for x in results)
    tokens = sum(x[1]["completion_tokens"] for x in results)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]

    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(lat),
        "p99_s": pct(0.99),
        "kv_bytes_mean": sum(x[1]["kv_cache_bytes"] for x in results) / len(results),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="runs:/<run_id>/model or a checkpoint directory")
    p.add_argument("--preset", default="demo", help="untrained preset used when --model is not given")
    p.add_argument("--kv-precision", default=None, help="kv_precision.json or run id for the calibrated app")
    p.add_argument("--prefixkv", default=None, help="prefixkv.json or run id for the calibrated app")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="PrefixKV keep ratio of the calibrated app")
    p.add_argument("--indexcache", default=None, help="indexcache.json or run id for the calibrated app")
    p.add_argument("--retention", type=float, default=None, help="IndexCache retention to serve")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32], help="client concurrency levels")
    p.add_argument("--requests-per-level", type=int, default=32, help="requests sent at each level")
    p.add_argument("--prompt-tokens", type=int, default=96, help="prompt length in tokens (bytes)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--max-batch-size", type=int, default=32, help="batch limit of the batched apps")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per model replica (3 apps)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads in the replica")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--time-limit", type=float, default=1500.0, help="stop starting new levels after this")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="deployments to compare")
    a = p.parse_args(argv)

    import mlflow
    import ray
    from ray import serve

    from serve.app import build
    from serve.config import ServeArgs
    from workers.model import checkpoint
    from workers.model.presets import get_preset
    from workers.model.transformer import CalibLM
    from workers.runtime import tracking
    from workers.runtime.cluster import init_ray

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = a.model
    if model is None:
        model = str(checkpoint.save(CalibLM(get_preset(a.preset)), work / a.preset))
    cfg = checkpoint.load_config(model)
    cal = {"kv_precision": a.kv_precision, "prefixkv": a.prefixkv}
    if a.kv_precision is None and a.prefixkv is None and a.indexcache is None:
        cal = default_calibration(cfg.n_layers, work)
    ctx = min(cfg.max_seq_len, a.prompt_tokens + a.max_tokens)
    prompt = prompt_text(ctx - a.max_tokens)
    body = {"model": "bench", "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0.0}
    common = dict(
        model=model,
        name="bench",
        replica_cpus=a.replica_cpus,
        torch_threads=a.torch_threads,
        max_ongoing_requests=max(a.concurrency) * 2,
        max_tokens_limit=max(a.max_tokens, 1),
    )
    apps = {
        "full-batched": ServeArgs(**common, max_batch_size=a.max_batch_size),
        "full-unbatched": ServeArgs(**common, max_batch_size=1),
        "calibrated": ServeArgs(
            **common,
            max_batch_size=a.max_batch_size,
            kv_precision=cal.get("kv_precision"),
            prefixkv=cal.get("prefixkv"),
            keep_ratio=a.keep_ratio if cal.get("prefixkv") else None,
            indexcache=a.indexcache,
            retention=a.retention,
        ),
    }
    cli.work_started()  # model and calibration checked: errors from here on are the benchmark's
    for attempt in range(3):  # a loaded machine can time a local node's startup out; try again
        try:
            init_ray()
            break
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
            time.sleep(10)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    t_start, rows = time.time(), []
    params = {k: v for k, v in vars(a).items() if k != "modes"} | {"model_resolved": model, "modes": ",".join(a.modes)}
    with tracking.start_run("serve_load", run_name="serve_load", params=params) as run:
        # All apps are up at once (idle replicas cost nothing) and the modes take turns at each
        # level, so a machine whose load drifts during the run biases no mode in particular.
        for mode in a.modes:
            serve.run(build(apps[mode]), name=mode, route_prefix=f"/{mode}")
            run_level(f"{url}/{mode}", {**body, "max_tokens": 2}, 1, 2, a.request_timeout)  # warm-up
        for c in a.concurrency:
            for mode in a.modes:
                if time.time() - t_start > a.time_limit:
                    print(f"time limit reached; skipping {mode} c={c}", flush=True)
                    continue
                row = {
                    "mode": mode,
                    **run_level(f"{url}/{mode}", body, c, max(a.requests_per_level, c), a.request_timeout),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                mlflow.log_metrics(
                    {f"{mode}/c{c}/{k}": row[k] for k in ("tokens_per_s", "p50_s", "p99_s", "kv_bytes_mean")}
                )
        table = report(rows, a.concurrency)
        mlflow.log_text(table, "serve_load.md")
        mlflow.log_text(json.dumps(rows, indent=1), "serve_load.json")
        print(table)
        print(f"MLflow run: {run.info.run_id}")
    serve.shutdown()


def report(rows: list[dict], levels: list[int]) -> str:
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    out = [
        "| mode | concurrency | tokens/s | p50 s | p99 s | KV bytes/request |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
            f"{r['p99_s']:.2f} | {r['kv_bytes_mean']:.0f} |"
        )
    out += [
        "",
        "| concurrency | batched / unbatched tokens/s | calibrated / full tokens/s | calibrated / full KV bytes |",
    ]
    out.append("| --- | --- | --- | --- |")
    for c in levels:
        b, u, k = by.get(("full-batched", c)), by.get(("full-unbatched", c)), by.get(("calibrated", c))

        def ratio(x, y, key):
            return f"{x[key] / y[key]:.2f}" if x and y and y[key] else "-"

        out.append(
            f"| {c} | {ratio(b, u, 'tokens_per_s')} | {ratio(k, b, 'tokens_per_s')} | {ratio(k, b, 'kv_bytes_mean')} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    cli.run(main)
