"""The PrefixKV search: exact budgets, monotone fractions, bisection == k-th value, bounded steps."""

import math

import numpy as np
import pytest

from tuning.prefixkv.plan import plan_counts, pyramid_fractions, schedule_fractions
from tuning.prefixkv.search import (
    RATIO_GRID,
    SearchConfig,
    budget_total,
    build_curve,
    build_curves,
    grid_fractions,
    solve,
    solve_bisect,
    solve_grid,
    solve_kth,
)


def _random_layers(rng, n_layers=6, n_tokens=97, skew=True):
    """Attention-like importances: heavy-tailed, a few big tokens, varying sharpness per layer."""
    out = []
    for layer in range(n_layers):
        x = rng.gamma(0.3 + 0.3 * layer if skew else 1.0, size=n_tokens)
        out.append(x / x.sum() * n_tokens)
    return out


def _adversarial_sets():
    rng = np.random.default_rng(7)
    return {
        "flat": [np.ones(50) for _ in range(4)],
        "ties": [np.repeat(rng.integers(1, 4, size=10).astype(float), 7) for _ in range(5)],
        "zeros": [np.zeros(20), np.r_[np.zeros(19), 5.0], np.ones(20)],
        "one_token_layers": [np.ones(1), np.ones(1), rng.random(40), np.ones(1)],
        "tiny_mass": [np.r_[1.0, np.full(30, 1e-300)], np.r_[1.0, np.full(30, 2e-300)]],
        "identical": [np.arange(30, 0, -1, dtype=float)] * 6,
        "ragged": [rng.random(n) for n in (3, 17, 64, 5, 200)],
    }


def test_curve_puts_protected_first_and_is_monotone():
    imp = np.array([0.1, 5.0, 0.2, 3.0, 0.0, 0.4])
    c = build_curve(imp, n_sink=1)
    assert c.n_protected == 2
    assert c.order[:2].tolist() == [0, 5]
    assert c.order[2:].tolist() == [1, 3, 2, 4]
    assert np.all(np.diff(c.cum) >= 0) and math.isclose(c.cum[-1], 1.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_sink", [0, 1, 4])
def test_budget_exact_and_methods_agree_on_random_curves(seed, n_sink):
    rng = np.random.default_rng(seed)
    curves = build_curves(_random_layers(rng, n_tokens=97 + seed), n_sink)
    total = sum(c.n_tokens for c in curves)
    floor = sum(c.n_protected for c in curves)
    for r in [x for x in RATIO_GRID if math.floor(x * total + 0.5) >= floor] + [1.0]:
        b, k = solve_bisect(curves, r), solve_kth(curves, r)
        assert int(b.counts.sum()) == b.budget == math.floor(r * total + 0.5) == int(k.counts.sum())
        assert b.counts.tolist() == k.counts.tolist()
        assert all(c.n_protected <= n <= c.n_tokens for c, n in zip(curves, b.counts))


@pytest.mark.parametrize("name", list(_adversarial_sets()))
def test_adversarial_curves_bounded_steps_and_agreement(name):
    curves = build_curves(_adversarial_sets()[name], n_sink=1)
    total, floor = sum(c.n_tokens for c in curves), sum(c.n_protected for c in curves)
    for max_steps in (1, 3, 64):
        for r in [x for x in RATIO_GRID if math.floor(x * total + 0.5) >= floor] + [1.0]:
            b = solve_bisect(curves, r, max_steps=max_steps)
            assert b.steps <= max_steps
            assert int(b.counts.sum()) == budget_total(curves, r)
            assert b.counts.tolist() == solve_kth(curves, r).counts.tolist(), (name, r, max_steps)


def test_flat_identical_layers_share_budget_evenly():
    curves = build_curves([np.ones(40)] * 4, n_sink=0)
    sol = solve_bisect(curves, 0.3)
    assert sol.counts.max() - sol.counts.min() <= 1 and sol.counts.sum() == 48


def test_sharper_layer_gets_fewer_tokens():
    """Threshold on attention *mass*: a layer concentrated on few tokens reaches p sooner."""
    sharp = np.r_[np.full(5, 100.0), np.ones(95)]
    flat = np.ones(100)
    sol = solve_bisect(build_curves([sharp, flat], n_sink=0), 0.3)
    assert sol.counts[0] < sol.counts[1]


@pytest.mark.parametrize("seed", range(3))
def test_fractions_non_decreasing_in_ratio(seed):
    rng = np.random.default_rng(100 + seed)
    curves = build_curves(_random_layers(rng, n_layers=8, n_tokens=150), n_sink=4)
    fr = grid_fractions(curves, SearchConfig(n_sink=4))
    assert fr.shape == (len(RATIO_GRID), 8)
    assert np.all(np.diff(fr, axis=0) >= 0)
    sols = solve_grid(curves, RATIO_GRID, method="kth")
    for i, r in enumerate(RATIO_GRID):
        assert np.allclose(sols[r].fractions(curves), fr[i])


def test_kept_set_is_prefix_of_each_layers_order_and_reaches_threshold():
    rng = np.random.default_rng(3)
    curves = build_curves(_random_layers(rng), n_sink=2)
    sol = solve_kth(curves, 0.25)
    for c, n in zip(curves, sol.counts):
        if n > c.n_protected:
            # Every layer that took extra tokens needed its last one to reach the threshold.
            assert c.cum[n - 1] <= sol.threshold


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_bad_ratios_rejected(bad):
    curves = build_curves([np.ones(20)] * 2, n_sink=1)
    with pytest.raises(ValueError, match="keep ratio"):
        solve_bisect(curves, bad)
    with pytest.raises(ValueError, match="keep ratio"):
        solve_kth(curves, bad)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="shorter than n_sink"):
        build_curves([np.ones(3)], n_sink=4)
    with pytest.raises(ValueError, match="non-negative"):
        build_curves([np.array([1.0, -1.0, 2.0])], n_sink=0)
    with pytest.raises(ValueError, match="always-kept"):
        solve_bisect(build_curves([np.ones(20)] * 3, n_sink=4), 0.1)
    with pytest.raises(ValueError, match="method"):
        solve(build_curves([np.ones(20)], n_sink=0), 0.5, method="greedy")
    with pytest.raises(ValueError, match="max_steps"):
        solve_bisect(build_curves([np.ones(20)], n_sink=0), 0.5, max_steps=0)
    with pytest.raises(ValueError, match="n_sink"):
        SearchConfig(n_sink=-1)
    with pytest.raises(ValueError, match="distinct"):
        solve_grid(build_curves([np.ones(20)], n_sink=0), [0.5, 0.5])


@pytest.mark.parametrize("n_tokens", [10, 64, 193])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 0.95, 1.0])
def test_plan_counts_exact_and_clamped(n_tokens, ratio):
    rng = np.random.default_rng(n_tokens)
    n_layers, n_sink = 7, 1
    for fr in (rng.random(n_layers), np.zeros(n_layers), pyramid_fractions(n_layers, ratio)):
        if ratio * n_tokens < n_sink + 1:
            continue
        counts = plan_counts(fr, n_tokens, ratio, n_sink)
        assert int(counts.sum()) == math.floor(ratio * n_layers * n_tokens + 0.5)
        assert counts.min() >= n_sink + 1 and counts.max() <= n_tokens


def test_plan_counts_follow_calibrated_fractions():
    curves = build_curves(_random_layers(np.random.default_rng(5), n_tokens=120), n_sink=4)
    sol = solve_bisect(curves, 0.2)
    assert plan_counts(sol.fractions(curves), 120, 0.2, 4).tolist() == sol.counts.tolist()


def test_schedule_fractions():
    cal = {0.1: [0.05, 0.15], 0.2: [0.1, 0.3]}
    assert np.allclose(schedule_fractions("prefixkv", 0.15, 2, cal), [0.075, 0.225])
    assert np.allclose(schedule_fractions("prefixkv", 1.0, 2, cal), [1.0, 1.0])
    assert np.allclose(schedule_fractions("uniform", 0.2, 3), 0.2)
    p = schedule_fractions("pyramid", 0.2, 4)
    assert np.all(np.diff(p) < 0) and math.isclose(p.mean(), 0.2)
    with pytest.raises(ValueError, match="schedule"):
        schedule_fractions("h2o", 0.2, 4)
    with pytest.raises(ValueError, match="layers"):
        schedule_fractions("prefixkv", 0.2, 3, cal)


def test_the_pipeline_checks_budgets_by_the_rule_the_actors_apply():
    """--context 96 with 4 layers: 0.05 * 96 = 4.8 rounds to the 5 tokens a layer always keeps, but
    the total 0.05 * 384 = 19.2 rounds to 19 < 20. The up-front check passed it, the actors refused."""
    from pipelines.prefixkv import RunConfig

    cfg = RunConfig(model="m", context=96, continuation=16)  # the layer count is not known yet
    with pytest.raises(ValueError, match=r"--context=96 .*19 tokens over 4 layers, fewer than the 20"):
        cfg.check_budgets(4)
    cfg.check_budgets(1)  # one layer: round(4.8) = 5 tokens, exactly the kept ones
    with pytest.raises(ValueError, match="always-kept"):  # what the actors run: the same rule
        solve_kth(build_curves([np.ones(96)] * 4, n_sink=4), 0.05)
    solve_kth(build_curves([np.ones(96)], n_sink=4), 0.05)
    with pytest.raises(ValueError, match="19 tokens over 4 layers"):
        plan_counts([0.05] * 4, 96, 0.05, 4)
