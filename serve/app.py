"""The serving application: a typed builder for `serve run` / `serve deploy`, and a Python entry.

    # 1. from the shell (the proxy listens on 127.0.0.1:8000 by default):
    serve run serve.app:build model=runs:/<run_id>/model prefixkv=<run_id> keep_ratio=0.5
    # 2. on a cluster, from a config file:
    serve deploy configs/serve.yaml
    # 3. from Python (the demo), or as a script that blocks until Ctrl-C:
    python -m serve.app --model artifacts/tiny --port 8000 --kv-precision kv_precision.json

    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
         -d '{"model": "calibray-tiny", "prompt": "The ", "max_tokens": 16}'

The builder validates every argument and resolves the calibrated configs on the driver, so a
bad model address or config id fails here, naming the argument, before any replica starts.
"""

from __future__ import annotations

import argparse
import os
import time

from ray import serve
from ray.serve import Application

from serve.calibration import CalibrationError, resolve
from serve.config import ServeArgs
from serve.ingress import Ingress
from serve.model_server import ModelServer, describe_model
from workers.runtime import cli


def build(args: ServeArgs) -> Application:
    """ServeArgs (or the dict Serve passes) -> Ingress bound to a ModelServer deployment."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    info = describe_model(args.model)
    cal = resolve(args, info.n_layers)
    if cal.pattern is not None and not info.has_indexer:
        raise CalibrationError(f"indexcache/pattern: model={args.model!r} has no DSA indexer to share")
    engine = {"max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_s}
    if args.max_context is not None:
        engine["max_context"] = args.max_context
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    actor_opts = {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus}
    if env:
        actor_opts["runtime_env"] = {"env_vars": env}
    scaling = (
        {"autoscaling_config": args.autoscaling_config}
        if args.autoscaling_config is not None
        else {"num_replicas": args.num_replicas or 1}
    )
    model = ModelServer.options(
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options=actor_opts,
        health_check_period_s=args.health_check_period_s,
        **scaling,
    ).bind(
        args.model,
        args.served_name(),
        cal.to_dict(),
        engine,
        args.max_tokens_limit,
        args.torch_threads,
    )
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": args.ingress_cpus},
        max_ongoing_requests=max(args.max_ongoing_requests * 4, 256),
    )
    return ingress.bind(model, args.served_name())


def start(
    args: ServeArgs | dict, host: str = "127.0.0.1", port: int = 8000, name: str = "calibray", route_prefix: str = "/"
) -> str:
    """Start Serve (proxy on host:port) in the current Ray cluster and deploy; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(args), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="runs:/<run_id>/model, a checkpoint directory, or hf:<dir>")
    p.add_argument("--name", default=None, help="served model id (default: derived from --model)")
    p.add_argument("--indexcache", default=None, help="indexcache.json path or MLflow run id")
    p.add_argument("--pattern", default=None, help="explicit IndexCache F/S pattern")
    p.add_argument("--retention", type=float, default=None, help="which IndexCache pattern to serve")
    p.add_argument("--kv-precision", default=None, help="kv_precision.json path or MLflow run id")
    p.add_argument("--kv-budget", type=float, default=None, help="which KVTuner map (equivalent bits)")
    p.add_argument("--prefixkv", default=None, help="prefixkv.json path or MLflow run id")
    p.add_argument("--keep-ratio", type=float, default=None, help="PrefixKV keep ratio to serve")
    p.add_argument("--num-replicas", type=int, default=1, help="model replicas")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per model replica")
    p.add_argument("--host", default="127.0.0.1", help="HTTP proxy host (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="HTTP proxy port")
    a = p.parse_args(argv)
    args = ServeArgs(
        model=a.model,
        name=a.name,
        indexcache=a.indexcache,
        pattern=a.pattern,
        retention=a.retention,
        kv_precision=a.kv_precision,
        kv_budget=a.kv_budget,
        prefixkv=a.prefixkv,
        keep_ratio=a.keep_ratio,
        num_replicas=a.num_replicas,
        max_batch_size=a.max_batch_size,
        replica_cpus=a.replica_cpus,
    )
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "local"))
    url = start(args, a.host, a.port)
    print(f"serving {args.served_name()} at {url}/v1/completions (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    cli.run(main)
