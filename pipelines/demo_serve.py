"""Demo stage: serve the demo model plain and calibrated on Ray Serve (127.0.0.1) and query both."""

from __future__ import annotations

import json

import httpx

PROMPTS = [
    'The "return" statement',
    "Class definitions\n*****************\n\nA class definition defines",
    "The with statement is used to",
]


def _complete(base: str, model: str, prompt: str, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0.0, **extra}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def _stream(base: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.8, "seed": 7, "stream": True}
    text = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def serve_and_query(runs: dict, retention: float = 0.25, port: int = 8000) -> dict:
    """Deploy the full-cache and the calibrated application side by side; returns what they answered."""
    from ray import serve

    from serve.app import start

    model = f"runs:/{runs['train_moe']}/model"
    common = {"model": model, "replica_cpus": 0.5, "ingress_cpus": 0.05, "max_batch_size": 8}
    calibrated = {**common, "name": "demo-calibrated", "indexcache": runs["indexcache"], "retention": retention}
    if runs.get("kvtuner_text"):
        calibrated.update(kv_precision=runs["kvtuner_text"])
    if runs.get("prefixkv_text"):
        calibrated.update(prefixkv=runs["prefixkv_text"], keep_ratio=0.5)
    base_full = start({**common, "name": "demo-full"}, port=port, name="full", route_prefix="/full")
    base_cal = start(calibrated, port=port, name="calibrated", route_prefix="/calibrated")
    out = {"endpoint": base_cal, "full": [], "calibrated": []}
    for p in PROMPTS:
        full = _complete(base_full, "demo-full", p)
        cal = _complete(base_cal, "demo-calibrated", p)
        out["full"].append(full)
        out["calibrated"].append(cal)
        print(
            f"prompt {p[:40]!r}\n  full       -> {full['choices'][0]['text'][:60]!r} "
            f"(KV {full['usage']['kv_cache_bytes']} B)\n  calibrated -> {cal['choices'][0]['text'][:60]!r} "
            f"(KV {cal['usage']['kv_cache_bytes']} B)",
            flush=True,
        )
    out["stream"] = _stream(base_cal, "demo-calibrated", PROMPTS[0])
    print(f"streamed (SSE, seed 7): {out['stream']!r}", flush=True)
    out["kv_bytes_full"] = sum(r["usage"]["kv_cache_bytes"] for r in out["full"])
    out["kv_bytes_calibrated"] = sum(r["usage"]["kv_cache_bytes"] for r in out["calibrated"])
    out["calibrated_args"] = calibrated
    serve.delete("full")
    return out
