"""The bad-input audit (benchmarks/faults.py) as tests: every case is `slow`; a few stand for them in CI.

A case passes when its CLI exits 2 with one ``<prog>: error:`` line naming the bad value or file,
no traceback, and neither Ray nor MLflow started (issue 17 item 3).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from benchmarks import faults

CASES = {c.id: c for c in faults.cases()}
# One per kind of check, the known cases first: the rounding of PrefixKV budgets, a
# truncated safetensors (it used to pass the driver and loop in replaced actors), a read-only
# SQLite store (109 s of retries), a binary corpus, corrupt tokenizer and config files.
CI = (
    "prefixkv/context-96",
    "kvtuner/truncated-weights",
    "prefixkv/readonly-store",
    "train_moe/binary-corpus",
    "kvtuner/hf-corrupt-tokenizer",
    "indexcache/corrupt-config",
)
# Known failures, with why (docs/RELIABILITY.md); xfail(strict) so a fix is noticed. None now.
KNOWN: dict[str, str] = {}


@pytest.fixture(scope="module")
def fixtures():
    # Directly under /tmp, not pytest's tmp_path: its parents are 0700, which the cases that run as
    # uid 65534 (setpriv, when tests run as root) could not traverse.
    root = Path(tempfile.mkdtemp(prefix="calibray-faults-"))
    yield faults.build_fixtures(root)
    shutil.rmtree(root, ignore_errors=True)


def _check(case_id: str, fixtures) -> None:
    o = faults.run_case(CASES[case_id], fixtures)
    assert o.clean, f"{case_id}: {o.verdict()} after {o.seconds:.0f} s; message: {o.message}"
    assert o.seconds < 60, f"{case_id}: took {o.seconds:.0f} s"  # bad input fails in seconds


def test_ci_cases_exist():
    assert set(CI) <= set(CASES) and set(KNOWN) <= set(CASES)


@pytest.mark.parametrize("case_id", CI)
def test_bad_input_is_refused_up_front(case_id, fixtures):
    _check(case_id, fixtures)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case_id",
    [pytest.param(i, marks=pytest.mark.xfail(reason=KNOWN[i], strict=True)) if i in KNOWN else i for i in CASES],
)
def test_every_bad_input(case_id, fixtures):
    _check(case_id, fixtures)
