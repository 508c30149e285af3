"""workers.stats: mean / SE, paired differences, markdown tables (and the reports built on them)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from workers.indexcache.report import paired
from workers.prefixkv.report import results_table, summarize
from workers.stats import markdown_table, mean_se, paired_difference


def test_mean_se_is_sample_sd_over_sqrt_n():
    values = [0.3, 1.7, 2.2, 0.9, 4.1, 2.6, 1.1]
    m, se = mean_se(values)
    assert m == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert se == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), rel=1e-14)
    m, se = mean_se([5])
    assert m == 5.0 and math.isnan(se)
    assert all(math.isnan(x) for x in mean_se([]))
    assert mean_se(iter([1, 2, 3])) == mean_se([1.0, 2.0, 3.0])  # any iterable, ints as floats


def test_paired_difference_is_the_mean_se_of_the_differences():
    assert paired_difference([1, 1, 0, 1], [0, 1, 0, 0]) == (0.5, math.sqrt(1 / 12))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    d, se = paired_difference(a, b)
    assert (d, se) == mean_se(a - b)
    # The estimators the per-method copies used (numpy ddof=1, torch unbiased) agree to rounding.
    assert se == pytest.approx(float((a - b).std(ddof=1) / math.sqrt(50)), rel=1e-13)
    assert d == pytest.approx(float(torch.tensor(a - b).mean()), rel=1e-13)
    with pytest.raises(ValueError, match="got 3 and 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="got 0 and 0"):
        paired_difference([], [])


def test_indexcache_paired_keeps_its_rules():
    a = torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64)
    p = paired(a, a - 0.5)
    assert (p.mean, p.n) == (0.5, 3) and p.se == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match=">= 2 windows"):
        paired(a[:1], a[:1])


def test_markdown_table_cells_and_header():
    rows = [{"name": "a", "bits": 4.0, "damage": 0.0123456, "n": 3}, {"name": "b", "bits": None, "damage": math.nan}]
    assert markdown_table(rows, ["name", "bits", "damage", "n"]) == (
        "| name | bits | damage | n |\n| --- | --- | --- | --- |\n| a | 4 | 0.01235 | 3 |\n| b |  |  |  |\n"
    )
    assert markdown_table(rows[:1], ["bits"], header=["equivalent bits"], number=".2f") == (
        "| equivalent bits |\n| --- |\n| 4.00 |\n"
    )
    with pytest.raises(ValueError, match="2 names for 1 columns"):
        markdown_table(rows, ["bits"], header=["a", "b"])


def test_prefixkv_results_table_is_unchanged():
    per = {"full@1": [1.0, 2.0, 4.0], "uniform-sum@0.2": [1.5, 2.5, 4.0], "prefixkv-sum@0.2": [1.25, 2.0, 4.5]}
    base = {"full@1": None, "uniform-sum@0.2": "full@1", "prefixkv-sum@0.2": "uniform-sum@0.2"}
    # the string the pre-merge prefixkv markdown_table wrote for these rows
    assert results_table(summarize(per, base.get), "NLL (nats)") == (
        "| method@ratio | NLL (nats) | SE | vs | paired diff | diff SE |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        "| full@1 | 2.3333 | 0.8819 |  |  |  |\n"
        "| uniform-sum@0.2 | 2.6667 | 0.7265 | full@1 | 0.3333 | 0.1667 |\n"
        "| prefixkv-sum@0.2 | 2.5833 | 0.9825 | uniform-sum@0.2 | -0.0833 | 0.3005 |\n"
    )


def test_one_verdict_rule_for_superiority_and_non_inferiority():
    from workers.stats import verdict

    assert verdict(-0.05, 0.01) == "met"  # lower is better, whole CI below 0
    assert verdict(0.05, 0.01) == "not met"
    assert verdict(-0.01, 0.01) == "within noise"  # CI [-0.030, +0.010] spans 0
    assert verdict(0.05, 0.01, higher_is_better=True) == "met"
    assert verdict(-0.05, 0.01, higher_is_better=True) == "not met"
    # non-inferiority: +0.004 +- 0.002 costs something, but its upper bound (0.0079) is inside 0.01
    assert verdict(0.004, 0.002, margin=0.01) == "met"
    assert verdict(0.016, 0.003, margin=0.01) == "not met"  # the SmolLM2 3.23-bit map: CI [0.010, 0.022]
    assert verdict(0.009, 0.003, margin=0.01) == "within noise"
    assert verdict(-0.01, 0.005, higher_is_better=True, margin=0.02) == "met"  # loses 0.01, CI inside 0.02
    assert verdict(0.0, 0.0, higher_is_better=True) == "within noise"  # a tie is not a win
