"""Composition of calibrated configs inside the serving cache.

For each pair of configs (IndexCache x KVTuner, IndexCache x PrefixKV, KVTuner x PrefixKV) and
all three: identity settings (all-F, 16-bit, keep 1.0) reproduce the plain model exactly, and
real settings reproduce a slow masked reference that applies the same rules token by token.
Single-method settings reproduce the helpers' own caches (PackedKVCache, EvictingCache).
"""

from __future__ import annotations

import pytest
import torch
from serve_masked_reference import MaskedReferenceCache

from tuning.kvtuner.space import Pair
from workers.caches.composed import ComposedCache, ComposedSpec
from workers.caches.evicting import EvictingCache
from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache
from workers.caches.quantized import PackedKVCache

L = 4
PROMPT, STEPS = 32, 12
REAL_BITS = dict(k_bits=(4, 2, 8, 4), v_bits=(2, 4, 4, 8), group=8, residual=8)
IDENTITY_BITS = dict(k_bits=(16,) * L, v_bits=(16,) * L, group=8, residual=8)
REAL_EVICT = dict(fractions=(0.3, 0.6, 0.5, 0.4), keep_ratio=0.5, n_sink=2)
IDENTITY_EVICT = dict(fractions=(0.3, 0.6, 0.5, 0.4), keep_ratio=1.0, n_sink=2)
PAIRS = {
    "indexcache+kv": ("FSFS", REAL_BITS, None, IDENTITY_BITS, None),
    "indexcache+prefixkv": ("FSFS", None, REAL_EVICT, None, IDENTITY_EVICT),
    "kv+prefixkv": (None, REAL_BITS, REAL_EVICT, IDENTITY_BITS, IDENTITY_EVICT),
    "all three": ("FSSS", REAL_BITS, REAL_EVICT, IDENTITY_BITS, IDENTITY_EVICT),
}


def greedy(model, make_cache, pattern=None, seed=1):
    """Prefill PROMPT random tokens then STEPS greedy decode steps -> (logits [STEPS, V], tokens, cache)."""
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    cache = make_cache()
    obs = getattr(cache, "observe", None)
    logits, toks = [], []
    with torch.inference_mode():
        lg = model(ids, positions=torch.arange(PROMPT)[None], cache=cache, pattern=pattern, observer=obs).logits[0, -1]
        for t in range(STEPS):
            logits.append(lg)
            toks.append(int(lg.argmax()))
            pos = torch.tensor([[PROMPT + t]])
            lg = model(torch.tensor([[toks[-1]]]), positions=pos, cache=cache, pattern=pattern, observer=obs)
            lg = lg.logits[0, -1]
    return torch.stack(logits), toks, cache


def spec(bits, evict) -> ComposedSpec:
    return ComposedSpec(L, **(bits or {}), **(evict or {}))


@pytest.fixture(scope="module")
def plain(tiny_model):
    return greedy(tiny_model, lambda: DynamicCache(L))


@pytest.mark.parametrize("pair", list(PAIRS))
def test_identity_settings_equal_plain_model(tiny_model, plain, pair):
    _, _, _, bits, evict = PAIRS[pair]
    pattern = "F" * L if pair.startswith(("indexcache", "all")) else None
    logits, toks, _ = greedy(tiny_model, lambda: ComposedCache(spec(bits, evict)), pattern)
    torch.testing.assert_close(logits, plain[0], rtol=0, atol=0)
    assert toks == plain[1]


@pytest.mark.parametrize("pair", list(PAIRS))
def test_real_settings_equal_masked_reference(tiny_model, plain, pair):
    pattern, bits, evict, _, _ = PAIRS[pair]
    s = spec(bits, evict)
    got, got_toks, cache = greedy(tiny_model, lambda: ComposedCache(s), pattern)
    ref, ref_toks, ref_cache = greedy(tiny_model, lambda: MaskedReferenceCache(s), pattern)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got_toks == ref_toks
    assert [cache.kept(i) for i in range(L)] == [ref_cache.kept(i) for i in range(L)]
    # The settings are real: the outputs move away from the plain model's.
    assert (got - plain[0]).abs().max() > 1e-3
    if evict:
        assert cache.nbytes() < plain[2].nbytes()
        for i in range(L):  # indexer keys followed their layer's evictions
            view_pos = cache.positions(i)
            assert view_pos.shape[1] == cache.kept(i) < PROMPT + STEPS
            assert bool((view_pos[:, 1:] > view_pos[:, :-1]).all())


def test_quantization_only_equals_kvtuner_packed_cache(tiny_model):
    pairs = tuple(Pair(k, v) for k, v in zip(REAL_BITS["k_bits"], REAL_BITS["v_bits"]))
    kvt = KVQuantConfig(pairs, mode="kivi", group=8, residual=8)
    a = greedy(tiny_model, lambda: ComposedCache(spec(REAL_BITS, None)))
    b = greedy(tiny_model, lambda: PackedKVCache(kvt))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[2].nbytes() == b[2].nbytes()


def test_eviction_only_equals_prefixkv_evicting_cache(tiny_model):
    a = greedy(tiny_model, lambda: ComposedCache(spec(None, REAL_EVICT)))
    b = greedy(tiny_model, lambda: EvictingCache(L, REAL_EVICT["fractions"], 0.5, n_sink=2))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert [a[2].kept(i) for i in range(L)] == [b[2].kept(i) for i in range(L)]
    assert sum(a[2].kept(i) for i in range(L)) < L * (PROMPT + STEPS)


def test_decode_eviction_never_touches_quantized_blocks(tiny_model):
    s = spec(REAL_BITS, REAL_EVICT)
    cache = ComposedCache(s)
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        tiny_model(ids, positions=torch.arange(PROMPT)[None], cache=cache, observer=cache.observe)
        frozen = [cache.positions(i)[:, : cache.layers[i].n_quantized].clone() for i in range(L)]
        assert sum(f.shape[1] for f in frozen) > 0, "the prefill should have quantized some blocks"
        for t in range(STEPS):
            pos = torch.tensor([[PROMPT + t]])
            tiny_model(torch.tensor([[65]]), positions=pos, cache=cache, observer=cache.observe)
    for i in range(L):
        held = cache.positions(i)[:, : frozen[i].shape[1]]
        assert torch.equal(held, frozen[i]), f"layer {i}: a quantized block changed"


def test_short_prompt_keeps_sinks_and_runs(tiny_model):
    s = spec(REAL_BITS, dict(REAL_EVICT, keep_ratio=0.1))
    cache = ComposedCache(s)
    with torch.inference_mode():
        out = tiny_model(torch.tensor([[1, 2]]), positions=torch.arange(2)[None], cache=cache, observer=cache.observe)
    assert torch.isfinite(out.logits).all()
    assert all(cache.kept(i) == 2 for i in range(L))


def test_bad_spec_names_the_field():
    with pytest.raises(ValueError, match="k_bits"):
        ComposedSpec(L, k_bits=(3,) * L, v_bits=(4,) * L)
    with pytest.raises(ValueError, match="keep_ratio"):
        ComposedSpec(L, fractions=(0.5,) * L, keep_ratio=0.0)
