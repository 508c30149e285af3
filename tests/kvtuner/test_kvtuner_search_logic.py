"""KVTuner search logic: pairs, budgets, Pareto pruning, clustering, the guarded NSGA-II searcher."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.kvtuner import KVTunerConfig
from tuning.kvtuner.search import GuardedSearcher, SpaceSpec, make_optuna_search
from tuning.kvtuner.space import (
    PAIRS,
    Pair,
    cluster_layers,
    equivalent_bits,
    group_candidates,
    pareto_front,
    pareto_prune,
    parse_pair,
    validate_budget,
)
from workers.kvtuner.report import select_for_budget
from workers.model.hf.address import model_shape
from workers.stats import paired_difference


def test_pairs_and_bits():
    assert len(PAIRS) == 9
    assert parse_pair("K8V4") == Pair(8, 4) and parse_pair("kv2") == Pair(2, 2)
    assert Pair(4, 4).name == "KV4" and Pair(8, 2).name == "K8V2"
    assert equivalent_bits([Pair(8, 4), Pair(2, 2)]) == 4.0
    with pytest.raises(ValueError, match="bits"):
        Pair(3, 4)
    with pytest.raises(ValueError, match="K3V"):
        parse_pair("K3V")
    with pytest.raises(ValueError, match="budget"):
        validate_budget(1.5)


def test_pareto_prune_keeps_only_undominated():
    # keys more sensitive: damage grows as key bits fall
    dmg = {p: (8 - p.k) * 1.0 + (8 - p.v) * 0.1 for p in PAIRS}
    keep = pareto_prune(dmg)
    for p in keep:
        assert not any(q.bits <= p.bits and dmg[q] < dmg[p] for q in PAIRS if q != p)
    assert Pair(8, 8) in keep and Pair(2, 2) in keep
    assert Pair(4, 8) not in keep  # K8V4 has the same bits and less damage
    assert [p.bits for p in keep] == sorted((p.bits for p in keep), reverse=True)
    assert pareto_front([(2, 5.0), (3, 1.0), (3, 2.0), (4, 1.0)]) == [0, 1]


def test_cluster_layer0_alone_and_k_capped():
    rng = np.random.default_rng(0)
    prof = np.concatenate([np.full((1, 9), 1e-1), rng.uniform(1e-4, 2e-4, (3, 9)), rng.uniform(1e-2, 2e-2, (3, 9))])
    g = cluster_layers(prof, 2)
    assert g[0] == 0 and 0 not in g[1:]
    assert len(set(g[1:4])) == 1 and len(set(g[4:])) == 1 and g[1] != g[4]
    assert cluster_layers(prof[:3], 8) == [0, 1, 2]  # k = min(8, N - 1) = 2: every layer alone
    assert cluster_layers(prof[:1], 4) == [0]
    cands = group_candidates(g, [[Pair(8, 8)], [Pair(4, 4)], [Pair(4, 2)], [Pair(4, 4)], [Pair(2, 2)]] + [[]] * 2)
    assert cands[0] == [Pair(8, 8)] and Pair(4, 2) in cands[1]


def test_guarded_searcher_rejects_infeasible_and_caches_repeats():
    """Maps over the budget never become trials; a map is never evaluated twice."""
    spec = SpaceSpec([0, 1, 1], [[Pair(8, 8), Pair(4, 4), Pair(2, 2)], [Pair(8, 4), Pair(4, 2), Pair(2, 2)]], 4.0)
    inner = make_optuna_search(spec, seed=0, population=4, points=[spec.config_for([Pair(4, 4), Pair(4, 2)])])
    s = GuardedSearcher(inner, spec)
    seen = []
    for i in range(40):
        cfg = s.suggest(f"t{i}")
        if cfg == GuardedSearcher.FINISHED:
            break
        assert spec.bits(cfg) <= 4.0
        assert spec.key(cfg) not in seen
        seen.append(spec.key(cfg))
        s.on_trial_complete(f"t{i}", {"damage": 1.0 / spec.bits(cfg), "bits": spec.bits(cfg)})
    feasible = sum(1 for a in spec.candidates[0] for b in spec.candidates[1] if equivalent_bits([a, b, b]) <= 4.0)
    assert len(seen) <= feasible
    assert s.stats["rejected_infeasible"] > 0
    assert seen[0] == ("KV4", "K4V2")  # the seeded uniform-like point comes first


def test_selection_and_paired():
    rows = [{"bits": 3.0, "damage": 0.2}, {"bits": 4.0, "damage": 0.1}, {"bits": 2.5, "damage": 0.2}]
    assert select_for_budget(rows, 3.0)["bits"] == 2.5  # tie on damage -> fewer bits
    assert select_for_budget(rows, 4.0)["bits"] == 4.0
    assert select_for_budget(rows, 2.0) is None
    d, se = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert d == 0.5 and se > 0


def test_driver_config_errors_before_work(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        KVTunerConfig(model="x", budget=[1.5])
    with pytest.raises(ValueError, match="bits"):
        KVTunerConfig(model="x", baselines=["K3V4"])
    with pytest.raises(ValueError, match="mode"):
        KVTunerConfig(model="x", mode="fp8")
    with pytest.raises(FileNotFoundError, match="missing"):
        model_shape(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        model_shape(f"hf:{tmp_path / 'nope'}")


def test_eval_seed_fixes_the_held_out_examples_across_calibration_seeds():
    from pipelines.kvtuner import heldout_seed, parse_args

    base = ["--model", "x"]
    assert parse_args(base).heldout_seed == 3 and parse_args([*base, "--seed", "1"]).heldout_seed == 4
    assert parse_args([*base, "--seed", "1", "--eval-seed", "3"]).heldout_seed == 3
    # what benchmarks rebuild from a run's MLflow params (strings; older runs have no eval_seed)
    assert heldout_seed({"seed": "2"}) == 5 and heldout_seed({"seed": "2", "eval_seed": "None"}) == 5
    assert heldout_seed({"seed": "2", "eval_seed": "3"}) == 3


def test_nearest_candidate_stands_in_for_pruned_pairs():
    from tuning.kvtuner.space import nearest_candidate

    cands = [Pair(8, 8), Pair(4, 8), Pair(4, 4), Pair(2, 4), Pair(2, 2)]
    assert nearest_candidate(Pair(4, 2), cands) == Pair(2, 4)  # K4V2 pruned: same bits, closest keys
    assert nearest_candidate(Pair(4, 4), cands) == Pair(4, 4)
    assert nearest_candidate(Pair(8, 4), cands) == Pair(4, 8)
    assert nearest_candidate(Pair(2, 2), [Pair(4, 4)]) is None
