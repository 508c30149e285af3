"""The batching engine without Serve: greedy == offline generation, seeds, stops, batching."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenRequest
from serve.sampling import SamplingParams
from serve.textstream import StopMatcher, TextStream
from workers.caches.composed import ComposedCache, ComposedSpec
from workers.caches.protocol import DynamicCache

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["The quick brown", "A stitch", "R", "calibrated caches keep"]


def offline_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """The model's own greedy generation: full forward over the whole sequence each step, no cache."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def make_engine(model, factory=None, batch=8) -> Engine:
    L = model.cfg.n_layers
    return Engine(
        model,
        factory or (lambda: DynamicCache(L)),
        lambda t: bytes([t]),
        EngineConfig(max_batch_size=batch, max_context=128),
    )


async def collect(engine: Engine, req: GenRequest) -> tuple[list[int], str, dict]:
    toks, text, done = [], [], None
    async for ev in engine.generate(req):
        if ev["type"] == "token":
            text.append(ev["text"])
            if ev["token"] is not None:
                toks.append(ev["token"])
        else:
            done = ev
    return toks, "".join(text), done


def run_all(engine: Engine, reqs: list[GenRequest]):
    async def go():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    return asyncio.run(go())


def test_concurrent_greedy_equals_offline_generation(tiny_model):
    engine = make_engine(tiny_model)
    reqs = [GenRequest(list(p.encode()), 12, GREEDY) for p in PROMPTS]
    results = run_all(engine, reqs)
    for r, (toks, _, done) in zip(reqs, results):
        assert toks == offline_greedy(tiny_model, r.prompt_ids, 12)
        assert done["usage"]["completion_tokens"] == 12 and done["finish_reason"] == "length"
    # The four requests shared decode steps (the batch was real, not serialised).
    assert engine.stats()["mean_decode_batch"] > 2


def test_batched_composed_caches_equal_single_requests(tiny_model):
    """Per-request evicting+quantizing caches inside a batch behave as when each runs alone."""
    L = tiny_model.cfg.n_layers
    s = ComposedSpec(L, k_bits=(4,) * L, v_bits=(4,) * L, group=4, residual=4, fractions=(0.5,) * L, keep_ratio=0.5)
    reqs = [GenRequest(list((p * 3).encode()), 8, GREEDY) for p in PROMPTS]
    batched = run_all(make_engine(tiny_model, lambda: ComposedCache(s)), reqs)
    single = [run_all(make_engine(tiny_model, lambda: ComposedCache(s), batch=1), [r])[0] for r in reqs]
    assert [b[0] for b in batched] == [x[0] for x in single]
    full = run_all(make_engine(tiny_model), reqs[:1])[0]
    assert batched[0][2]["usage"]["kv_cache_bytes"] < full[2]["usage"]["kv_cache_bytes"]


def test_same_seed_same_text_different_seed_differs(tiny_model):
    engine = make_engine(tiny_model)
    p = list(b"The ")
    reqs = [GenRequest(p, 16, SamplingParams(temperature=1.0, top_p=0.95), seed=s) for s in (7, 7, 8)]
    (a, _, _), (b, _, _), (c, _, _) = run_all(engine, reqs)
    assert a == b
    assert a != c


def test_stop_string_truncates_and_reports_stop(tiny_model):
    engine = make_engine(tiny_model)
    p = list(b"The quick")
    ((toks, text, _),) = run_all(engine, [GenRequest(p, 24, GREEDY)])
    full = bytes(toks).decode("utf-8", errors="replace")
    stop = full[3:5]
    ((_, text2, done),) = run_all(engine, [GenRequest(p, 24, GREEDY, stop=[stop])])
    assert text2 == full[: full.index(stop)]
    assert done["finish_reason"] == "stop"


def test_over_long_request_is_refused_before_work(tiny_model):
    engine = make_engine(tiny_model)
    with pytest.raises(ValueError, match="context"):
        run_all(engine, [GenRequest([65] * 120, 16)])


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(["END"])
    assert m.feed("abcE") == "abc"
    assert m.feed("N") == ""
    assert m.feed("Dzz") == ""
    assert m.stopped
    m2 = StopMatcher(["END"])
    assert m2.feed("xE") + m2.feed("Nq") + m2.flush() == "xENq"


def test_text_stream_joins_multibyte_characters():
    ts = TextStream()
    data = "é✓".encode()
    out = "".join(ts.push(bytes([b])) for b in data) + ts.finish()
    assert out == "é✓"


def test_s_layers_skip_their_indexer_while_serving(tiny_model):
    L = tiny_model.cfg.n_layers
    engine = Engine(
        tiny_model, lambda: DynamicCache(L), lambda t: bytes([t]), EngineConfig(max_context=128), pattern="FSFS"
    )
    before = tiny_model.indexer_calls()
    run_all(engine, [GenRequest(list(b"The quick"), 6, GREEDY) for _ in range(2)])
    after = tiny_model.indexer_calls()
    calls = [a - b for a, b in zip(after, before)]
    assert calls[0] > 0 and calls[2] > 0
    assert calls[1] == 0 and calls[3] == 0


def test_hf_model_is_served_with_the_same_engine(tiny_dense_trained, tmp_path):
    """An hf: export of a byte-vocabulary model: concurrent greedy == its own offline greedy."""
    from serve.model_server import describe_model, load_model
    from workers.model.hf.export import export_llama

    path = export_llama(tiny_dense_trained[1], tmp_path / "hf")
    info = describe_model(f"hf:{path}")
    assert info.n_layers == tiny_dense_trained[1].cfg.n_layers and not info.has_indexer
    model = load_model(f"hf:{path}", "cpu")
    L = info.n_layers
    s = ComposedSpec(L, k_bits=(8,) * L, v_bits=(8,) * L, group=4, residual=4, fractions=(0.5,) * L, keep_ratio=0.5)
    reqs = [GenRequest(list(p.encode()), 6, GREEDY) for p in PROMPTS[:3]]
    results = run_all(make_engine(model), reqs)
    for r, (toks, _, _) in zip(reqs, results):
        assert toks == offline_greedy(model, r.prompt_ids, 6)
    # The composed cache plugs into HF models through the same protocol.
    assert len(run_all(make_engine(model, lambda: ComposedCache(s)), reqs)[0][0]) == 6


def test_quantize_only_caches_decode_over_their_codes(tiny_dense_trained, monkeypatch):
    """An observer makes attention read a packed view's keys as tensors (dequantizing every held
    token each step), so the engine passes one only to caches that evict: a quantize-only composed
    cache's decode steps attend the codes (PackedKVView.fused_attend answers), alone and batched;
    with eviction as well, the observer is given and the codes are not attended."""
    from workers.caches.packed_view import PackedKVView

    fused = []
    original = PackedKVView.fused_attend

    def counting(self, q, q_pos, scale=None):
        out = original(self, q, q_pos, scale)
        fused.append(out is not None)
        return out

    monkeypatch.setattr(PackedKVView, "fused_attend", counting)
    model = tiny_dense_trained[1]  # dense attention: a DSA layer's sparse path never reads codes
    L = model.cfg.n_layers
    quant = ComposedSpec(L, k_bits=(4,) * L, v_bits=(2,) * L, group=4, residual=4)
    reqs = [GenRequest(list((p * 3).encode()), 6, GREEDY) for p in PROMPTS]
    for batch in (1, 8):
        fused.clear()
        results = run_all(make_engine(model, lambda: ComposedCache(quant), batch=batch), reqs)
        assert [done["finish_reason"] for _, _, done in results] == ["length"] * len(reqs)
        assert sum(fused) >= L, f"batch {batch}: decode never attended the codes ({len(fused)} calls)"
    both = ComposedSpec(L, k_bits=(4,) * L, v_bits=(2,) * L, group=4, residual=4, fractions=(0.5,) * L, keep_ratio=0.5)
    fused.clear()
    run_all(make_engine(model, lambda: ComposedCache(both)), reqs)
    assert not any(fused)
