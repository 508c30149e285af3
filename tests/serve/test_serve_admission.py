"""KV-cache memory admission: reservations measured on the deployment's own cache, and the engine
running as many requests together as their reservations allow (more with a calibrated cache)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_serve_engine import GREEDY, collect, make_engine, run_all

from serve.admission import KVReservations, KVShape
from serve.engine import Engine, EngineConfig, GenRequest
from workers.caches.composed import ComposedCache, ComposedSpec
from workers.caches.protocol import DynamicCache

N = 64  # prompt + max_tokens of every request below


def _specs(L: int) -> dict[str, ComposedSpec | None]:
    quant = {"k_bits": (4,) * L, "v_bits": (2,) * L, "group": 8, "residual": 8}
    return {
        "full": None,
        "kv": ComposedSpec(L, **quant),
        "kv+evict": ComposedSpec(L, **quant, fractions=(0.5,) * L, keep_ratio=0.5),
    }


def _factory(L: int, spec: ComposedSpec | None):
    return (lambda: DynamicCache(L)) if spec is None else (lambda: ComposedCache(spec))


def _model_bytes(model, factory, prompt: list[int], decode: int) -> int:
    """nbytes of a cache after the model's own prefill of `prompt` and `decode` greedy steps."""
    cache = factory()
    observer = getattr(cache, "observe", None)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, observer=observer).logits
        for i in range(decode):
            nxt = logits[:, -1:].argmax(-1)
            pos = torch.tensor([[len(prompt) + i]])
            logits = model(nxt, positions=pos, cache=cache, observer=observer).logits
    return int(cache.nbytes())


def test_a_reservation_is_what_the_cache_holds_after_the_model_ran(tiny_model):
    cfg = tiny_model.cfg
    shape = KVShape.of(cfg, next(tiny_model.parameters()).dtype)
    prompt = list(b"reservations are measured on the cache itself, not modelled.")[:48]
    held = {}
    for name, spec in _specs(cfg.n_layers).items():
        factory = _factory(cfg.n_layers, spec)
        reserve = KVReservations(factory, shape, bucket=16)
        # What a request of N tokens holds, whatever its prompt length: within its reservation,
        # and the reservation at most a bucket of full-precision tokens above the worst of them.
        held[name] = max(_model_bytes(tiny_model, factory, prompt[:p], N - p) for p in (16, 41, 48))
        per_fp_token = held["full"] / N  # the dict's first entry
        assert held[name] <= reserve(N) <= held[name] + 16 * per_fp_token, name
    assert held["kv+evict"] < held["kv"] < held["full"]
    # The full cache holds the same bytes per token however it was filled: exact.
    full = KVReservations(_factory(cfg.n_layers, None), shape, bucket=16)
    assert full(N - 16) == _model_bytes(tiny_model, _factory(cfg.n_layers, None), prompt, N - len(prompt))


def test_the_budget_bounds_concurrency_and_a_calibrated_cache_runs_more(tiny_model):
    L = tiny_model.cfg.n_layers
    shape = KVShape.of(tiny_model.cfg, torch.float32)
    budget = 2 * KVReservations(_factory(L, None), shape)(N)  # two full-cache requests
    reqs = [GenRequest(list(f"request {i} says".encode()), N - 16, GREEDY) for i in range(8)]
    peaks, outs = {}, {}
    for name, spec in _specs(L).items():
        factory = _factory(L, spec)
        engine = Engine(
            tiny_model,
            factory,
            lambda t: bytes([t]),
            EngineConfig(max_batch_size=8, max_context=128, kv_cache_bytes=budget),
            reserve=KVReservations(factory, shape),
        )
        outs[name] = run_all(engine, reqs)
        stats = engine.stats()
        peaks[name] = stats["peak_active"]
        assert stats["kv_reserved_bytes"] == 0  # every reservation given back
        assert all(done["finish_reason"] == "length" for _, _, done in outs[name])
    assert peaks["full"] == 2
    assert peaks["kv"] > 2 and peaks["kv+evict"] >= peaks["kv"]
    # Waiting for memory changes when a request runs, never what it generates.
    unbounded = run_all(
        Engine(tiny_model, _factory(L, None), lambda t: bytes([t]), EngineConfig(max_batch_size=8, max_context=128)),
        reqs,
    )
    assert [o[0] for o in outs["full"]] == [o[0] for o in unbounded]


def test_a_request_larger_than_the_whole_budget_is_refused_before_queueing(tiny_model):
    L = tiny_model.cfg.n_layers
    factory = _factory(L, None)
    reserve = KVReservations(factory, KVShape.of(tiny_model.cfg, torch.float32))
    engine = Engine(
        tiny_model,
        factory,
        lambda t: bytes([t]),
        EngineConfig(max_context=128, kv_cache_bytes=reserve(64)),
        reserve=reserve,
    )
    with pytest.raises(ValueError, match=r"needs \d+ bytes of KV cache; this replica's budget is"):
        asyncio.run(collect(engine, GenRequest(list(b"x" * 40), 60, GREEDY)))
    assert engine.stats()["waiting"] == 0
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(tiny_model, factory, lambda t: bytes([t]), EngineConfig(kv_cache_bytes=100))
    with pytest.raises(ValueError, match="kv_cache_bytes=0"):
        EngineConfig(kv_cache_bytes=0)


def test_prefill_forwards_stay_within_max_prefill_tokens(tiny_model):
    L = tiny_model.cfg.n_layers
    shapes: list[tuple[int, int]] = []
    hook = tiny_model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        cfg = EngineConfig(max_batch_size=8, max_context=128, max_prefill_tokens=40)
        engine = Engine(tiny_model, _factory(L, None), lambda t: bytes([t]), cfg)
        reqs = [GenRequest(list(f"prompt number {i:02d}".encode()), 4, GREEDY) for i in range(6)]  # 16 tokens
        bounded = run_all(engine, reqs)
    finally:
        hook.remove()
    prefills = [(b, t) for b, t in shapes if t > 1]
    assert sum(b for b, _ in prefills) == 6 and all(b * t <= 40 for b, t in prefills)
    assert max(b for b, _ in prefills) == 2  # grouped up to the bound, not one by one
    unbounded = run_all(make_engine(tiny_model), reqs)
    assert [o[0] for o in bounded] == [o[0] for o in unbounded]
    with pytest.raises(ValueError, match="max_prefill_tokens=0"):
        EngineConfig(max_prefill_tokens=0)
