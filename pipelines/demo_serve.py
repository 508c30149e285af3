"""Demo stage: SmolLM2-135M on Ray Serve with the calibrated caches, beside a full-cache deployment.

Both are OpenAI applications on 127.0.0.1 (`/full/v1` and `/calibrated/v1`) queried with the
official `openai` client, greedy, the same chat messages. Reported: each answer, whether the two
deployments answered alike, and the KV-cache bytes each held (`usage.kv_cache_bytes`).
"""

from __future__ import annotations

QUESTIONS = [
    "What does the Python `with` statement do?",
    "Name three built-in Python data types.",
    "How do I reverse a list in Python?",
]
MAX_TOKENS = 48


def serve_and_query(model: str, kvtuner_run: str, kv_budget: float, prefixkv_run: str, keep_ratio: float) -> dict:
    """Deploy full and calibrated side by side, ask both the same questions; returns what they said."""
    from openai import OpenAI
    from ray import serve

    from serve.app import start

    common = {"model": model, "replica_cpus": 0.5, "ingress_cpus": 0.05, "torch_threads": 1, "max_batch_size": 4}
    calibrated = {
        **common,
        "name": "smollm2-calibrated",
        "kv_precision": kvtuner_run,
        "kv_budget": kv_budget,
        "prefixkv": prefixkv_run,
        "keep_ratio": keep_ratio,
    }
    base_full = start({**common, "name": "smollm2-full"}, name="full", route_prefix="/full")
    base_cal = start(calibrated, name="calibrated", route_prefix="/calibrated")
    out = {"endpoint": f"{base_cal}/v1", "calibrated_args": calibrated, "answers": []}
    try:
        clients = {
            "full": (OpenAI(base_url=f"{base_full}/v1", api_key="unused"), "smollm2-full"),
            "calibrated": (OpenAI(base_url=f"{base_cal}/v1", api_key="unused"), "smollm2-calibrated"),
        }
        for q in QUESTIONS:
            row = {"question": q}
            for arm, (client, name) in clients.items():
                r = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0.0
                )
                row[arm] = r.choices[0].message.content
                row[f"{arm}_kv_bytes"] = r.usage.model_extra.get("kv_cache_bytes", 0)
            out["answers"].append(row)
            print(f"Q: {q}\n  full:       {row['full']!r}\n  calibrated: {row['calibrated']!r}", flush=True)
    finally:
        serve.delete("full")
    out["same_answers"] = sum(r["full"] == r["calibrated"] for r in out["answers"])
    out["kv_bytes_full"] = sum(r["full_kv_bytes"] for r in out["answers"])
    out["kv_bytes_calibrated"] = sum(r["calibrated_kv_bytes"] for r in out["answers"])
    return out
