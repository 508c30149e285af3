"""The serving application: a typed builder for `serve run` / `serve deploy`, and a Python entry.

    # 1. from the shell (the proxy listens on 127.0.0.1:8000 by default):
    serve run serve.app:build model=runs:/<run_id>/model prefixkv=<run_id> keep_ratio=0.5
    # 2. on a cluster, from a config file:
    serve deploy configs/serve.yaml
    # 3. as a script that blocks until Ctrl-C, from flags or from the same config file (its
    #    applications are built here first; a bad one exits 2 naming it, a failed deploy exits 1):
    python -m serve.app --model smollm2-135m --port 8000 --kv-precision kv_precision.json
    python -m serve.app --config configs/serve.yaml --port 8001

    curl -s 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
         -d '{"model": "calibray-smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'

The builder validates every argument and resolves the calibrated configs on the driver, so a
bad model address or config id fails here, naming the argument, before any replica starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
    engine = {
        "max_batch_size": args.max_batch_size,
        "batch_wait_s": args.batch_wait_s,
        "kv_cache_bytes": args.kv_cache_bytes,
        "max_prefill_tokens": args.max_prefill_tokens,
    }
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
    url = deploy({"host": host, "port": port}, [(name, route_prefix, build(args))])
    return f"{url}{route_prefix.rstrip('/')}"


def load_config(path: str, host: str | None = None, port: int | None = None) -> tuple[dict, list[tuple]]:
    """A `serve deploy` config file -> (http_options, [(name, route_prefix, Application)]), every
    application built here on the driver: a bad file, field or argument fails before Serve starts.
    host/port, when given, override the file's http_options."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not YAML ({' '.join(str(e).split())})") from None
    try:
        schema = ServeDeploySchema.model_validate(doc)
    except ValueError as e:
        raise ValueError(f"--config {path}: not a Serve config: {e}") from None
    # Serve's own default host is 0.0.0.0; ours is loopback unless the file or the flag says otherwise.
    http = {
        "host": "127.0.0.1",
        "port": 8000,
        **schema.http_options.model_dump(include={"host", "port"}, exclude_unset=True),
    }
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    apps = []
    for app in schema.applications:
        if app.import_path != "serve.app:build":
            raise ValueError(
                f"--config {path}: application {app.name!r} imports {app.import_path!r}, not serve.app:build"
            )
        try:
            apps.append((app.name, app.route_prefix, build(app.args)))
        except (ValueError, OSError) as e:  # ServeArgs, CalibrationError, CheckpointError: name the app
            raise ValueError(f"--config {path}: application {app.name!r}: {e}") from None
    return http, apps


def deploy(http: dict, apps: list[tuple]) -> str:
    """Start Serve's proxy on http's host:port and run each application; -> base URL. Raises
    DeployError (with Serve's message) when an application fails to start."""
    serve.start(http_options=http)
    for name, route_prefix, app in apps:
        try:
            serve.run(app, name=name, route_prefix=route_prefix)
        except RuntimeError as e:
            raise DeployError(f"application {name!r} failed to deploy: {' '.join(str(e).split())}") from None
    return f"http://{http['host']}:{http['port']}"


class DeployError(RuntimeError):
    """An application that built on the driver failed in Serve (a replica's constructor raised)."""


def _watch(names: list[str], period_s: float = 5.0) -> None:
    """Block until Ctrl-C; exit 1 if an application stops being healthy (a replica cannot restart)."""
    from ray.serve.schema import ApplicationStatus

    while True:
        time.sleep(period_s)
        status = serve.status().applications
        for name in names:
            st = status.get(name)
            if st is None or st.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                why = " ".join((st.message if st else "was deleted").split())
                print(
                    f"serve.app: error: application {name!r} is {st.status if st else 'gone'}: {why}", file=sys.stderr
                )
                raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", default=None, help="a `serve deploy` config file (configs/serve.yaml)")
    src.add_argument("--model", default=None, help="runs:/<run_id>/model, a checkpoint directory, or hf:<dir>")
    p.add_argument("--name", default=None, help="served model id (default: derived from --model)")
    p.add_argument("--indexcache", default=None, help="indexcache.json path or MLflow run id")
    p.add_argument("--pattern", default=None, help="explicit IndexCache F/S pattern")
    p.add_argument("--retention", type=float, default=None, help="which IndexCache pattern to serve")
    p.add_argument("--kv-precision", default=None, help="kv_precision.json path or MLflow run id")
    p.add_argument("--kv-budget", type=float, default=None, help="which KVTuner map (equivalent bits)")
    p.add_argument("--kv-prefill", choices=("full", "quantized"), default="full", help="prefill regime of the map")
    p.add_argument("--prefixkv", default=None, help="prefixkv.json path or MLflow run id")
    p.add_argument("--keep-ratio", type=float, default=None, help="PrefixKV keep ratio to serve")
    p.add_argument("--num-replicas", type=int, default=1, help="model replicas")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per model replica")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache bytes per replica (admission bound)")
    p.add_argument("--host", default=None, help="HTTP proxy host (default 127.0.0.1, or the config's)")
    p.add_argument("--port", type=int, default=None, help="HTTP proxy port (default 8000, or the config's)")
    a = p.parse_args(argv)
    if a.port is not None and not 0 < a.port < 65536:
        raise ValueError(f"--port {a.port}: must be in 1..65535")
    if a.config is not None:
        http, apps = load_config(a.config, a.host, a.port)
    else:
        args = ServeArgs(
            model=a.model,
            name=a.name,
            indexcache=a.indexcache,
            pattern=a.pattern,
            retention=a.retention,
            kv_precision=a.kv_precision,
            kv_budget=a.kv_budget,
            kv_prefill=a.kv_prefill,
            prefixkv=a.prefixkv,
            keep_ratio=a.keep_ratio,
            num_replicas=a.num_replicas,
            max_batch_size=a.max_batch_size,
            replica_cpus=a.replica_cpus,
            kv_cache_bytes=a.kv_cache_bytes,
        )
        http = {"host": a.host or "127.0.0.1", "port": a.port or 8000}
        apps = [("calibray", "/", build(args))]
    # Only now: every application built, so bad input never waits for a cluster.
    from workers.runtime.cluster import init_ray

    init_ray()  # RAY_ADDRESS joins a cluster; otherwise a local one, every service on 127.0.0.1
    try:
        url = deploy(http, apps)
        for name, route_prefix, _ in apps:
            base = f"{url}{(route_prefix or '/').rstrip('/')}"
            print(f"serving {name!r} at {base}/v1/chat/completions and {base}/v1/completions", flush=True)
        print("Ctrl-C to stop", flush=True)
        _watch([name for name, _, _ in apps])
    except DeployError as e:
        print(f"serve.app: error: {e}", file=sys.stderr)
        serve.shutdown()
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # also while deploying: stop what started, no traceback
        serve.shutdown()


if __name__ == "__main__":
    cli.run(main)
