"""Prefix reuse against the naive loop, cost accounting and overlap on the trained tiny model."""

from __future__ import annotations

import pytest
import torch

from tuning.indexcache.cost import analytic_units, naive_units
from tuning.indexcache.fidelity import FidelityConfig
from tuning.indexcache.search import SearchState, greedy_search
from workers.indexcache.distill import DistillConfig, distill, multi_layer_kl
from workers.indexcache.evaluate import ShardEvaluator, topk_overlap, window_nll


@pytest.fixture(scope="module")
def model(tiny_trained):
    return tiny_trained[1].eval()


@pytest.fixture(scope="module")
def windows(corpus):
    return corpus.eval_windows("calib", 65, 6)  # T = 64, K = 8: k/L = 1/8


def test_prefix_reuse_equals_naive_and_counts_match(model, windows):
    n = len(model.layers)
    runs = {}
    for mode in ("prefix", "naive"):
        ev = ShardEvaluator(model, windows, batch_size=4, mode=mode)
        calls0 = sum(model.indexer_calls())
        state = greedy_search(SearchState(n, (0.25,), mode=mode), ev)
        runs[mode] = (state, ev, sum(model.indexer_calls()) - calls0)
        # Counted layer forwards equal the analytic count of the committed trace.
        assert ev.units() == analytic_units(state, ev.rows, ev.n_rows)
    (p, pev, pcalls), (q, qev, qcalls) = runs["prefix"], runs["naive"]
    assert p.pattern == q.pattern and p.pattern.count("F") == 1
    assert [s.committed for s in p.steps] == [s.committed for s in q.steps]
    for a, b in zip(p.steps, q.steps):
        for layer in a.final:
            assert a.final[layer].mean == pytest.approx(b.final[layer].mean, rel=1e-6, abs=1e-7)
    assert qev.units() == naive_units(n, n - 1, windows.shape[0])
    assert pev.units() < qev.units()
    # S layers really skip their indexer: prefix reuse runs fewer indexers than naive.
    assert 0 < pcalls < qcalls


def test_searched_losses_match_a_plain_forward(model, windows):
    ev = ShardEvaluator(model, windows, batch_size=4)
    state = greedy_search(SearchState(len(model.layers), (0.5,)), ev)
    plain = window_nll(model, windows, state.pattern, batch_size=4).mean()
    assert state.steps[-1].loss == pytest.approx(float(plain), rel=1e-5)


def test_multi_fidelity_counts_match(model, windows):
    ev = ShardEvaluator(model, windows, batch_size=2)
    cfg = FidelityConfig(rungs=(0.5, 1.0), eta=3.0, min_keep=1)
    state = greedy_search(SearchState(len(model.layers), (0.25,), fidelity=cfg), ev)
    assert ev.units() == analytic_units(state, ev.rows, ev.n_rows)
    assert state.steps[0].rungs[0][0] == 0.5 and len(state.steps[0].final) == 1


def test_overlap_matrix_is_a_similarity(model, windows):
    total, count = topk_overlap(model, windows, batch_size=4)
    m = total / count
    n = len(model.layers)
    assert count == windows.shape[0] * (64 - 8)
    assert torch.allclose(m.diagonal(), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(m, m.T) and bool(((m >= 0) & (m <= 1)).all())
    assert float(m[0, 1]) < 1.0


def test_distillation_trains_only_retained_indexers(model, corpus):
    train = corpus.eval_windows("train", 65, 16)
    pattern = "FSFS"
    with torch.no_grad():
        before = float(multi_layer_kl(model, train[:4, :-1], pattern))
    tuned, curve = distill(model, pattern, train[:4], DistillConfig(steps=4, lr=3e-3, batch_size=4))
    with torch.no_grad():
        after = float(multi_layer_kl(tuned, train[:4, :-1], pattern))
    assert after < before
    for i, (a, b) in enumerate(zip(model.layers, tuned.layers)):
        changed = {n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)}
        assert all(n.startswith("attn.indexer.") for n in changed)
        assert bool(changed) == (pattern[i] == "F")
