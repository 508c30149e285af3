"""Fixtures for the serving tests: the session's tiny model, calibrated-config files, and one
real Ray Serve instance (HTTP proxy on 127.0.0.1) with a full-cache and a calibrated app."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from serve_util import free_port, wait_ready


@pytest.fixture(scope="session")
def tiny_model(tiny_trained):
    """The session's trained tiny DSA-MoE CalibLM (tests/conftest.py), in eval mode."""
    return tiny_trained[1].eval()


@pytest.fixture(scope="session")
def calib_files(tmp_path_factory) -> dict[str, str]:
    """kv_precision.json / prefixkv.json / indexcache.json in the helpers' formats, for 4 layers."""
    d = tmp_path_factory.mktemp("serve_calib")
    kv = {
        "method": "kvtuner",
        "mode": "kivi",
        "group_size": 8,
        "residual": 8,
        "layers": [{"layer": i, "k_bits": k, "v_bits": v} for i, (k, v) in enumerate([(8, 4), (4, 2), (4, 4), (2, 2)])],
    }
    pkv = {
        "version": 1,
        "model": "tiny",
        "n_layers": 4,
        "n_sink": 2,
        "context": 64,
        "samples": 4,
        "ratios": [0.25, 0.5],
        "default_score": "sum",
        "window": 16,
        "scores": {"sum": {"fractions": [[0.2, 0.3, 0.25, 0.25], [0.4, 0.6, 0.5, 0.5]]}},
    }
    ic = {
        "n_layers": 4,
        "patterns": {
            "0.5": {"retention": 0.5, "searched": {"pattern": "FSFS"}, "uniform": {"pattern": "FSFS"}},
            "0.25": {"retention": 0.25, "searched": {"pattern": "FSSS"}, "uniform": {"pattern": "FSSS"}},
        },
    }
    out = {}
    for name, body in (("kv_precision", kv), ("prefixkv", pkv), ("indexcache", ic)):
        p = d / f"{name}.json"
        p.write_text(json.dumps(body))
        out[name] = str(p)
    return out


SMALL = dict(replica_cpus=0.25, ingress_cpus=0.05, torch_threads=1, max_tokens_limit=32, health_check_period_s=1.0)


@pytest.fixture(scope="session")
def serve_urls(ray_local, tiny_checkpoint, calib_files):
    """{"full": base URL of the full-cache app (2 replicas), "cal": the calibrated app (1 replica)}."""
    from ray import serve

    from serve.app import build
    from serve.config import ServeArgs

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    full = ServeArgs(model=str(tiny_checkpoint), name="tiny", num_replicas=2, **SMALL)
    cal = ServeArgs(
        model=str(tiny_checkpoint),
        name="tiny",
        kv_precision=calib_files["kv_precision"],
        prefixkv=calib_files["prefixkv"],
        keep_ratio=0.5,
        indexcache=calib_files["indexcache"],
        retention=0.5,
        **SMALL,
    )
    serve.run(build(full), name="full", route_prefix="/full", blocking=False)
    serve.run(build(cal), name="cal", route_prefix="/cal", blocking=False)
    urls = {"full": f"{base}/full", "cal": f"{base}/cal"}
    for u in urls.values():
        wait_ready(u)
    yield urls
    serve.shutdown()


@contextmanager
def one_off_app(serve_urls: dict, name: str, args):
    """An application for one test, deleted afterwards: the session's logical CPUs are shared with
    the Ray Train tests, which cannot start while Serve replicas hold them."""
    from ray import serve

    try:
        yield _add_app(serve_urls, name, args)
    finally:
        serve.delete(name)


def _add_app(serve_urls: dict, name: str, args) -> str:
    """Deploy one more application on the session's Serve instance; -> its base URL, once ready."""
    from ray import serve

    from serve.app import build

    serve.run(build(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = serve_urls["full"].removesuffix("/full") + f"/{name}"
    wait_ready(url)
    return url


@pytest.fixture(scope="session")
def chat_url(serve_urls, chat_qwen3_dir) -> str:
    """Base URL of a random tiny Qwen3 with a BPE chat tokenizer (tests/conftest.py chat_qwen3_dir)."""
    from serve.config import ServeArgs

    return _add_app(serve_urls, "oai", ServeArgs(model=f"hf:{chat_qwen3_dir}", name="qwen3-chat", **SMALL))


@pytest.fixture(scope="session")
def smollm2_url(serve_urls, smollm2_dir) -> str:
    """Base URL of SmolLM2-135M-Instruct, full cache (the shipped model, converted once by smollm2_dir)."""
    from serve.config import ServeArgs

    small = {**SMALL, "replica_cpus": 0.5, "torch_threads": 2}
    return _add_app(serve_urls, "smol", ServeArgs(model="smollm2-135m", name="smollm2", **small))
