"""Importance collection and the evicting cache on the real model (tiny preset, random weights)."""

import dataclasses
import math

import pytest
import torch

from kernels import attention_received
from workers.caches.evicting import EvictingCache
from workers.caches.protocol import DynamicCache
from workers.caches.scoring import ScoreConfig
from workers.eval import continuation_logits
from workers.model.presets import get_preset
from workers.model.transformer import CalibLM
from workers.prefixkv.importance import collect_importance
from workers.prefixkv.methods import Method

L = 4  # tiny preset layers


@pytest.fixture(scope="module")
def model():
    """Dense tiny model: fast, and every layer attends to every key it is given."""
    torch.manual_seed(0)
    return CalibLM(dataclasses.replace(get_preset("tiny"), indexer=None, moe=None)).eval()


@pytest.fixture(scope="module")
def sparse_model():
    """The tiny preset as is: DSA indexer + top-k sparse attention + MoE (indexer keys are evicted too)."""
    torch.manual_seed(0)
    return CalibLM(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(1))


def dense_received(q, k, q_pos, k_pos):
    """The whole [B, H, T, S] map at once: the ground truth the chunked kernel must match."""
    rep = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(rep, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.double(), kk.double()) / math.sqrt(q.shape[-1])
    vis = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    p = s.masked_fill(~vis[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return p.sum(dim=(1, 2)) / q.shape[2]


class Recorder:
    def __init__(self):
        self.calls = {}

    def __call__(self, layer, q, k, q_pos, k_pos):
        self.calls[layer] = (q.clone(), k.clone(), q_pos.clone(), k_pos.clone())


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_importance_equals_dense(model, tokens, chunk):
    rec = Recorder()
    with torch.no_grad():
        model(tokens, observer=rec)
    imp = collect_importance(model, tokens, ScoreConfig("sum", chunk=chunk))
    win = collect_importance(model, tokens, ScoreConfig("window", window=11, chunk=chunk))
    assert imp.shape == (L, 2, 90)
    for layer, (q, k, qp, kp) in rec.calls.items():
        assert torch.allclose(imp[layer], dense_received(q, k, qp, kp), atol=1e-5)
        assert torch.allclose(win[layer], dense_received(q[:, -11:], k, qp[:, -11:], kp), atol=1e-5)
        # Every query's row sums to 1 over heads-averaged keys: mass is conserved.
        assert torch.allclose(imp[layer].sum(-1), torch.full((2,), 90.0, dtype=torch.float64), atol=1e-3)
        assert torch.allclose(attention_received(q, k, qp, kp, chunk=5), imp[layer].float(), atol=1e-5)


def _prefill(model, tokens, cache):
    with torch.no_grad():
        model(tokens, cache=cache, observer=cache.observe)


@pytest.mark.parametrize("mode", ["sum", "window", "recency", "random"])
def test_eviction_keeps_planned_counts_with_true_positions(model, tokens, mode):
    counts = [6, 30, 12, 90]
    cache = EvictingCache(L, [0.25] * L, 0.4, n_sink=4, score=ScoreConfig(mode, window=8), counts=counts)
    full = DynamicCache(L)
    _prefill(model, tokens, cache)
    with torch.no_grad():
        model(tokens, cache=full)
    for layer in range(L):
        pos = cache.positions(layer)
        assert cache.kept(layer) == counts[layer]
        for row in range(2):
            p = pos[row]
            assert torch.all(p[1:] > p[:-1]), "kept tokens stay in original order"
            assert p[:4].tolist() == [0, 1, 2, 3] and p[-1].item() == 89, "sinks and newest kept"
            # Keys are stored after RoPE: a kept token's key is the full cache's key at its position.
            assert torch.equal(cache.layers[layer].k[row], full.layers[layer].k[row, p])
            assert torch.equal(cache.layers[layer].v[row], full.layers[layer].v[row, p])
    if mode == "recency":
        assert cache.positions(0)[0].tolist() == [0, 1, 2, 3, 88, 89]


def test_eviction_keeps_top_scored_tokens(model, tokens):
    imp = collect_importance(model, tokens, ScoreConfig("sum"))
    cache = EvictingCache(L, [0.3] * L, 0.3, n_sink=2, score=ScoreConfig("sum"), counts=[20] * L)
    _prefill(model, tokens, cache)
    for layer in range(L):
        for row in range(2):
            s = imp[layer, row].clone()
            s[:2] = s[-1] = float("inf")
            want = torch.sort(torch.sort(-s, stable=True).indices[:20]).values
            assert cache.positions(layer)[row].tolist() == want.tolist()


def test_planned_counts_exact_total_and_decode_cap(model, tokens):
    fr = [0.1, 0.2, 0.35, 0.55]
    cache = EvictingCache(L, fr, 0.3, n_sink=4, score=ScoreConfig("sum"))
    _prefill(model, tokens[:, :80], cache)
    assert sum(cache.kept(i) for i in range(L)) == round(0.3 * L * 80)
    assert [cache.kept(i) for i in range(L)] == sorted(cache.kept(i) for i in range(L))
    for t in range(80, 90):
        with torch.no_grad():
            model(tokens[:, t : t + 1], cache=cache, observer=cache.observe)
        for layer in range(L):
            cap = max(5, math.floor(cache.counts[layer] / 80 * (t + 1) + 0.5))
            assert cache.kept(layer) == min(cap, cache.kept(layer)) <= cap
            assert cache.positions(layer)[0, -1].item() == t


@pytest.mark.parametrize("name", ["prefixkv", "uniform", "pyramid", "recency", "random"])
def test_ratio_one_equals_uncompressed_model(model, tokens, name):
    ctx, cont = tokens[:, :70], tokens[:, 70:]
    ref = continuation_logits(model, ctx, cont, make_cache=lambda: DynamicCache(L))
    m = Method(name, ratio=1.0, n_layers=L, calibrated={0.5: [0.5] * L})
    out = continuation_logits(model, ctx, cont, **m.forward_kwargs())
    assert torch.equal(out, ref)
    assert [m.cache.kept(i) for i in range(L)] == [89] * L


def test_compression_changes_outputs_and_memory(model, tokens):
    ctx, cont = tokens[:, :70], tokens[:, 70:]
    full = Method("full", n_layers=L)
    ref = continuation_logits(model, ctx, cont, **full.forward_kwargs())
    m = Method("uniform", ratio=0.2, n_layers=L)
    out = continuation_logits(model, ctx, cont, **m.forward_kwargs())
    assert not torch.allclose(out, ref)
    assert m.cache.nbytes() < 0.3 * full.cache.nbytes()


def test_bad_inputs_rejected(model, tokens):
    with pytest.raises(ValueError, match="keep ratio"):
        EvictingCache(L, [0.5] * L, 1.5)
    with pytest.raises(ValueError, match="keep ratio"):
        Method("uniform", ratio=0.0, n_layers=L)
    with pytest.raises(ValueError, match="layers"):
        EvictingCache(L, [0.5] * 3, 0.5)
    with pytest.raises(ValueError, match="method"):
        Method("h2o", ratio=0.5, n_layers=L)
    with pytest.raises(ValueError, match="score mode"):
        ScoreConfig("max")
    with pytest.raises(ValueError, match="shorter than n_sink"):
        _prefill(model, tokens[:, :3], EvictingCache(L, [0.5] * L, 0.5, n_sink=4))
    with pytest.raises(ValueError, match="always-kept"):
        _prefill(model, tokens[:, :20], EvictingCache(L, [0.1] * L, 0.1, n_sink=4))
    cache = EvictingCache(L, [0.5] * L, 0.5)
    with torch.no_grad():
        model(tokens, cache=cache)  # no observer: the cache cannot score
        with pytest.raises(RuntimeError, match="observe"):
            model(tokens[:, :1], cache=cache)


@pytest.mark.parametrize("which", ["model", "sparse_model"])
def test_decode_through_evicted_cache_equals_full_model_restricted_to_kept_tokens(which, tokens, request):
    """Positions stay true: attending to the kept subset of an uncompressed cache gives the same logits."""
    model = request.getfixturevalue(which)
    ctx, cont = tokens[:, :60], tokens[:, 60:70]
    cache = EvictingCache(L, [0.3] * L, 0.3, n_sink=4, score=ScoreConfig("window", window=8))
    _prefill(model, ctx, cache)
    full = DynamicCache(L)
    with torch.no_grad():
        model(ctx, cache=full)
    for layer in range(L):
        keep = cache.positions(layer)  # [B, S] == indices into the full cache (positions 0..59)
        src = full.layers[layer]
        full.layers[layer] = type(src)(
            torch.stack([src.k[b, keep[b]] for b in range(2)]),
            torch.stack([src.v[b, keep[b]] for b in range(2)]),
            keep.clone(),
            None if src.idx_k is None else torch.stack([src.idx_k[b, keep[b]] for b in range(2)]),
        )
    pos = torch.arange(60, 70).expand(2, -1)
    with torch.no_grad():
        ref = model(cont, positions=pos, cache=full).logits
        out = model(cont, cache=cache, observer=cache.observe).logits  # default positions from length()
    assert torch.allclose(out, ref, atol=1e-6)


def test_score_pooling_averages_neighbouring_keys_and_is_validated():
    """pool=3: each key's score is the mean over itself and its stored neighbours (2 at the edges)."""
    from pipelines.prefixkv import RunConfig
    from workers.caches.scoring import received

    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 9, 2, 8)
    q_pos, k_pos = torch.arange(5, 9)[None], torch.arange(9)[None]
    plain = received(ScoreConfig("window", window=3), q, k, q_pos, k_pos)[0]
    pooled = received(ScoreConfig("window", window=3, pool=3), q, k, q_pos, k_pos)[0]
    assert torch.allclose(pooled[4], plain[3:6].mean()) and torch.allclose(pooled[0], plain[:2].mean())
    assert torch.allclose(pooled[-1], plain[-2:].mean())
    for bad in (0, 2):
        with pytest.raises(ValueError, match="pool"):
            ScoreConfig("sum", pool=bad)
    with pytest.raises(ValueError, match="--pool=4"):
        RunConfig(model="x", pool=4)


def test_random_scores_exist_for_deep_models_and_keep_their_values():
    """The hash salt overflowed int64 from layer 7 at seed 0 and at any layer for seeds >= 1 (a
    30-layer model crashed); the wrapped salt gives shallow layers the values they always had."""
    from workers.caches.scorers.random import RandomScorer

    cfg = ScoreConfig("random", seed=0)
    pos = torch.arange(64).view(1, 64)
    scores = [RandomScorer().static(cfg, layer, pos) for layer in range(32)]
    assert all(((s >= 0) & (s <= 1)).all() for s in scores)
    assert len({tuple(s.flatten().tolist()) for s in scores}) == 32  # every layer draws its own
    h = pos.long() * 6364136223846793005 + 3 * 1442695040888963407  # the original formula (seed 0)
    h = (h ^ (h >> 29)) * 0x5851F42D4C957F2D
    assert torch.equal(scores[3], ((h >> 33) & 0xFFFFFF).float() / float(0xFFFFFF))


@pytest.mark.parametrize("which", ["model", "sparse_model"])
def test_one_scored_prefill_replays_every_budgets_eviction(which, tokens, request):
    """Evicting caches filled from one shared prefill (prefill_scored) keep the same tokens and
    give the same logits as each running its own prefill with its observer; without the scores
    the shared prefill is refused for an evicting cache."""
    from workers.eval import prefill_scored

    m = request.getfixturevalue(which)
    ctx, y = tokens[:, :80], tokens[:, 80:]
    score = ScoreConfig("window", window=8)
    shared = prefill_scored(m, ctx, [score, ScoreConfig("recency")])
    fractions = {"prefixkv": {0.3: [0.6, 0.2, 0.2, 0.2]}}
    for name, ratio in [("uniform", 0.3), ("pyramid", 0.5), ("prefixkv", 0.3), ("recency", 0.3)]:
        own, replayed = (Method(name, ratio, L, score, 4, fractions["prefixkv"]) for _ in range(2))
        a = continuation_logits(m, ctx, y, **own.forward_kwargs())
        b = continuation_logits(m, ctx, y, prefilled=shared, **replayed.forward_kwargs())
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for layer in range(L):
            assert torch.equal(replayed.cache.positions(layer), own.cache.positions(layer))
        assert replayed.cache.kept(1) < 80  # it did evict
    with pytest.raises(ValueError, match="ScoredPrefill"):
        continuation_logits(m, ctx, y, prefilled=shared.kv, **Method("uniform", 0.3, L, score, 4).forward_kwargs())
    other = Method("uniform", 0.3, L, ScoreConfig("window", window=4), 4)
    with pytest.raises(ValueError, match="scored by"):
        continuation_logits(m, ctx, y, prefilled=shared, **other.forward_kwargs())
