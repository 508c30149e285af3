"""The HTTP API on a real Ray Serve instance (127.0.0.1): round trips, validation, seeds,
greedy equivalence, calibrated KV bytes, and surviving the death of a replica."""

from __future__ import annotations

import json
import time

import pytest
import requests
from test_serve_engine import offline_greedy

GOOD = {"model": "tiny", "prompt": "The quick", "max_tokens": 8, "temperature": 0.0}


def post(url: str, body=None, raw: str | None = None, **kw) -> requests.Response:
    if raw is not None:
        return requests.post(
            f"{url}/v1/completions", data=raw, headers={"content-type": "application/json"}, timeout=60
        )
    return requests.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def sse_events(resp: requests.Response) -> list:
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_lists_the_served_model(serve_urls):
    full = requests.get(f"{serve_urls['full']}/v1/models", timeout=30).json()
    cal = requests.get(f"{serve_urls['cal']}/v1/models", timeout=30).json()
    assert [m["id"] for m in full["data"]] == ["tiny"]
    assert full["data"][0]["max_context"] == 128
    assert cal["data"][0]["calibration"]["pattern"] == "FSFS"
    assert cal["data"][0]["calibration"]["keep_ratio"] == "0.5"


def test_completion_round_trip(serve_urls):
    r = post(serve_urls["full"], GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    u = body["usage"]
    assert u["prompt_tokens"] == len(b"The quick") and u["completion_tokens"] == 8
    assert u["total_tokens"] == u["prompt_tokens"] + 8 and u["kv_cache_bytes"] > 0


def test_streaming_round_trip_matches_whole_completion(serve_urls):
    body = {**GOOD, "temperature": 0.8, "seed": 5, "max_tokens": 12}
    whole = post(serve_urls["full"], body).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with post(serve_urls["full"], streamed, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # OpenAI's include_usage: one last chunk with no choices carries the usage.
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert all(c.get("usage") is None for c in chunks)


BAD = [
    ({**GOOD, "prompt": ""}, 400, "prompt"),
    ({**GOOD, "prompt": "x" * 200}, 400, "prompt"),
    ({**GOOD, "prompt": "x" * 120, "max_tokens": 20}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 100}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": "8"}, 400, "max_tokens"),
    ({**GOOD, "temperature": -0.5}, 400, "temperature"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    ({**GOOD, "top_p": 0.0}, 400, "top_p"),
    ({**GOOD, "top_p": 1.5}, 400, "top_p"),
    ({**GOOD, "seed": -1}, 400, "seed"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**GOOD, "stream": "yes"}, 400, "stream"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, 400, "prompt"),
    ({**GOOD, "model": "gpt-4"}, 404, "model"),
    ('{"model": "tiny", "prompt": ', 400, "body"),
    ("[1, 2]", 400, "body"),
]


@pytest.mark.parametrize("bad,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_4xx_naming_the_field_then_good_request_succeeds(serve_urls, bad, status, param):
    url = serve_urls["full"]
    r = post(url, raw=bad) if isinstance(bad, str) else post(url, bad)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param in err["message"] or param == "body"
    assert post(url, GOOD).status_code == 200


def test_same_seed_same_text(serve_urls):
    body = {**GOOD, "temperature": 1.0, "top_p": 0.9, "max_tokens": 16}
    a = post(serve_urls["full"], {**body, "seed": 123}).json()["choices"][0]["text"]
    b = post(serve_urls["full"], {**body, "seed": 123}).json()["choices"][0]["text"]
    c = post(serve_urls["full"], {**body, "seed": 124}).json()["choices"][0]["text"]
    assert a == b
    assert a != c


def test_greedy_over_http_equals_offline_generation(serve_urls, tiny_model):
    for prompt in ("The quick", "Ray"):
        text = post(serve_urls["full"], {**GOOD, "prompt": prompt, "max_tokens": 10}).json()["choices"][0]["text"]
        ref = offline_greedy(tiny_model, list(prompt.encode()), 10)
        assert text == bytes(ref).decode("utf-8", errors="replace")


def test_calibrated_deployment_holds_fewer_kv_bytes(serve_urls):
    body = {**GOOD, "prompt": "The quick brown fox jumps over the lazy dog. " * 2, "max_tokens": 16}
    full = post(serve_urls["full"], body).json()["usage"]
    cal = post(serve_urls["cal"], body).json()["usage"]
    assert cal["prompt_tokens"] == full["prompt_tokens"] and cal["completion_tokens"] == 16
    assert cal["kv_cache_bytes"] < 0.6 * full["kv_cache_bytes"]


def test_a_kv_budget_refuses_what_can_never_fit_and_serves_the_rest(serve_urls, tiny_checkpoint, tiny_model):
    import torch
    from conftest import SMALL, one_off_app

    from serve.admission import KVReservations, KVShape
    from serve.config import ServeArgs
    from workers.caches.protocol import DynamicCache

    L = tiny_model.cfg.n_layers
    budget = KVReservations(lambda: DynamicCache(L), KVShape.of(tiny_model.cfg, torch.float32))(48)
    args = ServeArgs(model=str(tiny_checkpoint), name="tiny", kv_cache_bytes=budget, **SMALL)
    with one_off_app(serve_urls, "kvb", args) as url:
        r = post(url, {**GOOD, "prompt": "x" * 40, "max_tokens": 30})  # 70 tokens: more than the budget holds
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert f"budget is {budget} bytes" in r.json()["error"]["message"]
        ok = post(url, GOOD)
        assert ok.status_code == 200 and ok.json()["usage"]["kv_cache_bytes"] <= budget


def _replica_actors(app: str) -> list[str]:
    """Names of the live Model replica actors of one app (Serve names them SERVE_REPLICA::app#Model#id)."""
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#Model#")
    )


def test_killing_one_replica_leaves_the_app_answering(serve_urls):
    import ray

    names = _replica_actors("full")
    assert len(names) == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    # Right away: the other replica (or a retry on it) answers every request.
    for _ in range(4):
        assert post(serve_urls["full"], GOOD).status_code == 200
    # Then Serve replaces the dead replica, and the app still answers.
    t0 = time.time()
    while time.time() - t0 < 120:
        alive = _replica_actors("full")
        if len(alive) == 2 and names[0] not in alive:
            break
        time.sleep(1)
    assert len(alive) == 2 and names[0] not in alive
    assert post(serve_urls["full"], GOOD).status_code == 200


def _kill_the_only_replica_mid_request(app: str) -> str:
    """Wait until the app's one replica is generating, then kill it; -> the killed replica's name."""
    import ray
    from ray import serve

    (name,) = _replica_actors(app)
    handle = serve.get_deployment_handle("Model", app_name=app)
    t0 = time.time()
    while handle.info.remote().result()["stats"]["active"] == 0:
        assert time.time() - t0 < 60, "the request never reached the replica"
        time.sleep(0.02)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def test_a_request_in_flight_on_a_killed_replica_is_sent_again(serve_urls, tiny_checkpoint):
    """Non-streamed: the client has seen nothing, so it gets its answer from the replacement replica.
    Streamed after output: an error event naming the cause, never a silent truncation."""
    from conftest import SMALL, one_off_app

    from serve.config import ServeArgs

    args = ServeArgs(model=str(tiny_checkpoint), name="tiny", num_replicas=1, **{**SMALL, "max_tokens_limit": 96})
    with one_off_app(serve_urls, "kill1", args) as url:
        _kill_mid_request(url)


def _kill_mid_request(url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {**GOOD, "prompt": "A", "max_tokens": 96, "n": 16, "temperature": 1.0, "seed": 3}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, body)
        killed = _kill_the_only_replica_mid_request("kill1")
        r = pending.result()
    assert r.status_code == 200, r.text
    assert killed not in _replica_actors("kill1")
    assert [c["text"] for c in r.json()["choices"]] == [c["text"] for c in post(url, body).json()["choices"]]
    # Streamed: output already sent when the replica dies.
    stream = {**body, "n": 1, "stream": True}
    with requests.post(f"{url}/v1/completions", json=stream, stream=True, timeout=120) as resp:
        lines = resp.iter_lines(decode_unicode=True)
        first = next(x for x in lines if x.startswith("data: "))
        assert "choices" in json.loads(first[len("data: ") :])
        _kill_the_only_replica_mid_request("kill1")
        rest = [json.loads(x[len("data: ") :]) for x in lines if x.startswith("data: {")]
    errors = [e["error"] for e in rest if "error" in e]
    assert errors and errors[0]["code"] == "unavailable" and "died after it streamed output" in errors[0]["message"]


def _outcome(url: str, body: dict) -> str:
    """One request -> 'ok' (a whole answer), 'died-after-output' (a streamed error event naming the
    replica's death after output was sent), or what else went wrong (status and message)."""
    if not body.get("stream"):
        r = requests.post(f"{url}/v1/completions", json=body, timeout=300)
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        return "ok" if ok else f"{r.status_code}: {r.text[:200]}"
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300) as r:
        if r.status_code != 200:
            return f"{r.status_code}: {r.text[:200]}"
        events = sse_events(r)
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    if errors:
        e = errors[0]
        return "died-after-output" if "died after it streamed output" in e["message"] else f"error: {e}"
    finished = [c for e in events if isinstance(e, dict) for c in e.get("choices", []) if c.get("finish_reason")]
    return "ok" if finished and events[-1] == "[DONE]" else f"truncated: {events[-2:]}"


@pytest.mark.slow  # the issue caps CI's kill tests at three (training driver, training worker, one search)
def test_a_replica_killed_under_load_loses_no_request(serve_urls, tiny_checkpoint):
    """24 clients' requests (half streamed) on 2 replicas, one replica killed while they run: every
    non-streamed request and every stream that had sent nothing is answered (sent again to the
    surviving or replacement replica); a stream that had sent output ends with an error event naming
    the cause. None is lost, none silently truncated, none a 503."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from conftest import SMALL, one_off_app

    from serve.config import ServeArgs

    args = ServeArgs(model=str(tiny_checkpoint), name="tiny", num_replicas=2, **{**SMALL, "max_tokens_limit": 64})
    with one_off_app(serve_urls, "load", args) as url:
        names = _replica_actors("load")
        assert len(names) == 2
        bodies = [
            {**GOOD, "prompt": f"{i} x", "max_tokens": 48, "temperature": 1.0, "seed": i, "stream": i % 2 == 1}
            for i in range(24)
        ]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_outcome, url, b) for b in bodies]
            t0 = time.time()
            while sum(f.done() for f in futures) < 4:
                assert time.time() - t0 < 240, "the load never got going"
                time.sleep(0.05)
            in_flight = sum(not f.done() for f in futures)
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            outcomes = [f.result() for f in futures]
    counts = Counter(outcomes)
    print(f"replica killed with {in_flight} of 24 requests in flight: {dict(counts)}")
    assert in_flight >= 8  # the kill landed mid-load
    assert set(counts) <= {"ok", "died-after-output"}, counts
    streamed_deaths = [o for o, b in zip(outcomes, bodies, strict=True) if o == "died-after-output"]
    assert all(b["stream"] for o, b in zip(outcomes, bodies, strict=True) if o != "ok")
    assert counts["ok"] >= 24 - 4 and len(streamed_deaths) <= 4, counts  # at most its 4 in-flight streams
