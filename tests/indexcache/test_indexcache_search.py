"""Greedy search, retention arithmetic, successive halving, cost and resume: no model, no Ray."""

from __future__ import annotations

import pytest

from tests.indexcache.synthetic import SyntheticEvaluator
from tuning.indexcache.cost import analytic_units, naive_units
from tuning.indexcache.fidelity import FidelityConfig, score_candidates
from tuning.indexcache.losses import LossSum, reduce_shards
from tuning.indexcache.patterns import (
    flip,
    indexer_fraction_removed,
    n_full_layers,
    serving_layer,
    uniform_interleave,
    validate_pattern,
)
from tuning.indexcache.search import SearchState, check_compatible, greedy_search, trace_rows


def test_retention_rounding_and_uniform_interleave():
    assert [n_full_layers(r, 12) for r in (1.0, 0.5, 0.25, 0.125)] == [12, 6, 3, 2]
    assert n_full_layers(0.125, 20) == 3  # half rounds up, not to even
    assert n_full_layers(0.01, 12) == 1
    assert uniform_interleave(12, 3) == "FSSSFSSSFSSS"
    assert uniform_interleave(12, 2) == "FSSSSSFSSSSS"
    assert uniform_interleave(47, 12).count("F") == 12
    assert serving_layer("FSSFS") == [0, 0, 0, 3, 3]
    assert indexer_fraction_removed("FSSS") == 0.75


@pytest.mark.parametrize(
    "bad, match",
    [("SFFF", "must start"), ("FXF", "only 'F' and 'S'"), ("", "non-empty"), ("FFF", "has 3 layers")],
)
def test_bad_patterns_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_pattern(bad, 4)


@pytest.mark.parametrize("bad", [0, 1.5, -0.25])
def test_bad_retention_is_named(bad):
    with pytest.raises(ValueError, match=str(bad)):
        SearchState(n_layers=12, retentions=(0.5, bad))


def test_bad_fidelity_is_named():
    with pytest.raises(ValueError, match="end at 1.0"):
        FidelityConfig(rungs=(0.25, 0.5))
    with pytest.raises(ValueError, match="eta"):
        FidelityConfig(eta=1.0)


def test_greedy_commits_the_best_candidate_every_step():
    ev = SyntheticEvaluator(12)
    state = greedy_search(SearchState(12, (0.5, 0.25, 0.125)), ev)
    assert len(state.steps) == 10 and state.pattern.count("F") == 2 and state.pattern[0] == "F"
    pattern = "F" * 12
    for step in state.steps:
        candidates = [i for i in range(1, 12) if pattern[i] == "F"]
        assert sorted(step.final) == candidates
        brute = {c: ev._loss(flip(pattern, c), ev.n_rows).mean for c in candidates}
        assert step.committed == min(brute, key=lambda c: (brute[c], c))
        assert step.loss == pytest.approx(brute[step.committed])
        assert step.gap >= 0
        pattern = step.pattern
    # One run serves every retention: the trace passes through 6, 3 and 2 F layers.
    assert [state.pattern_at(r).count("F") for r in (0.5, 0.25, 0.125)] == [6, 3, 2]
    rows = trace_rows(state)
    assert rows[0]["n_candidates"] == 11 and rows[-1]["n_full"] == 2


def test_ties_break_to_the_lowest_layer():
    state = greedy_search(SearchState(6, (0.5,)), SyntheticEvaluator(6, flat=True))
    assert [s.committed for s in state.steps] == [1, 2, 3]
    assert state.pattern == "FSSSFF"


def test_counted_units_equal_the_analytic_count():
    for mode, fidelity in [("prefix", None), ("naive", None), ("prefix", FidelityConfig((0.25, 1.0), 4))]:
        ev = SyntheticEvaluator(12, mode=mode)
        kw = {"fidelity": fidelity} if fidelity else {}
        state = greedy_search(SearchState(12, (0.25,), mode=mode, **kw), ev)
        assert ev.units() == state.total_units() == analytic_units(state, ev.rows, ev.total_rows())
    assert naive_units(12, 9, 1) == 768
    ev = SyntheticEvaluator(12, mode="naive")
    state = greedy_search(SearchState(12, (0.25,), mode="naive"), ev)
    assert ev.units() == naive_units(12, 9, ev.n_rows)


def test_successive_halving_prunes_and_skips_useless_rungs():
    calls = []

    def evaluate(cands, fraction):
        calls.append((tuple(cands), fraction))
        return {c: LossSum(float(c), 1) for c in cands}

    cfg = FidelityConfig(rungs=(0.25, 1.0), eta=4, min_keep=2)
    final, rungs = score_candidates(range(1, 12), evaluate, cfg)
    assert calls == [(tuple(range(1, 12)), 0.25), ((1, 2, 3), 1.0)]
    assert sorted(final) == [1, 2, 3] and len(rungs) == 2
    calls.clear()
    score_candidates([4, 7], evaluate, cfg)
    assert calls == [((4, 7), 1.0)]


def test_multi_fidelity_is_cheaper_and_agrees_on_a_clear_problem():
    exact = greedy_search(SearchState(12, (0.25,)), SyntheticEvaluator(12, n_rows=32))
    ev = SyntheticEvaluator(12, n_rows=32)
    mf = greedy_search(SearchState(12, (0.25,), fidelity=FidelityConfig((0.25, 1.0), 4)), ev)
    assert mf.pattern == exact.pattern
    assert mf.total_units() < 0.75 * exact.total_units()


def test_state_roundtrip_and_resume_equals_uninterrupted():
    full = greedy_search(SearchState(12, (0.5, 0.125)), SyntheticEvaluator(12))
    part = greedy_search(SearchState(12, (0.5, 0.125)), SyntheticEvaluator(12), max_steps=4)
    text = part.dumps()
    restored = SearchState.loads(text)
    assert restored.to_dict() == part.to_dict()
    check_compatible(restored, 12, (0.125, 0.5), "prefix")
    resumed = greedy_search(restored, SyntheticEvaluator(12))
    assert [s.to_dict() for s in resumed.steps][4:] == [
        {**s.to_dict(), "units": resumed.steps[i + 4].units} for i, s in enumerate(full.steps[4:])
    ]
    assert resumed.pattern == full.pattern
    with pytest.raises(ValueError, match="targets"):
        check_compatible(restored, 12, (0.25,), "prefix")


def test_resume_refuses_a_different_model():
    part = greedy_search(SearchState(12, (0.25,)), SyntheticEvaluator(12, seed=0), max_steps=2)
    with pytest.raises(ValueError, match="differ from the stopped run"):
        greedy_search(SearchState.loads(part.dumps()), SyntheticEvaluator(12, seed=1))


def test_reduce_shards_is_exact_and_checks_candidates():
    a, b = {1: LossSum(1.5, 3), 2: LossSum(2.0, 3)}, {1: LossSum(0.5, 1), 2: LossSum(1.0, 1)}
    assert reduce_shards([a, b]) == {1: LossSum(2.0, 4), 2: LossSum(3.0, 4)}
    with pytest.raises(RuntimeError, match="disagree"):
        reduce_shards([a, {1: LossSum(0.5, 1)}])
