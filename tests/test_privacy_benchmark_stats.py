"""The statistics benchmarks/privacy.py reports against the issue's goals: canary exposure, the
membership attack's AUC and the paired gap to the no-DP row, on inputs whose answers are known."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("privacy")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_exposure_is_the_maximum_when_ranked_first_and_one_bit_in_the_middle(bench: ModuleType) -> None:
    candidates = np.arange(1.0, 512.0)  # M = 511 candidate losses 1..511
    assert bench.exposure(0.5, candidates) == pytest.approx(9.0)  # rank 1 of 512: log2(512)
    assert bench.exposure(255.5, candidates) == pytest.approx(1.0)  # rank 256: 9 - log2(256)
    assert bench.exposure(600.0, candidates) == pytest.approx(0.0)  # ranked last


def test_membership_auc_is_one_half_and_one_where_it_must_be(bench: ModuleType) -> None:
    assert bench.auc_lower_is_member(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert bench.auc_lower_is_member(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5  # ties
    assert bench.auc_lower_is_member(np.array([0.9]), np.array([0.1])) == 0.0
    assert math.isnan(bench.auc_lower_is_member(np.array([]), np.array([0.1])))


def test_paired_gap_is_the_accuracy_difference_with_an_interval_around_it(bench: ModuleType) -> None:
    # 1,000 items: the no-DP row is right on 770, the DP row on 720, 50 items apart, always the
    # DP row the wrong one: a gap of exactly 5 points, and an interval that holds it.
    no_dp = "1" * 770 + "0" * 230
    dp = "1" * 720 + "0" * 280
    gap, lo, hi = bench.paired_gap(no_dp, dp, seed=3)
    assert gap == 5.0 and lo < 5.0 < hi and hi - lo < 4.0
    # The same two accuracies with the rows disagreeing on many more items: a wider interval.
    mixed = "0" * 100 + "1" * 720 + "0" * 180
    gap2, lo2, hi2 = bench.paired_gap(no_dp, mixed, seed=3)
    assert gap2 == 5.0 and hi2 - lo2 > hi - lo
    assert bench.paired_gap(dp, dp, seed=3) == (0.0, 0.0, 0.0)


def test_paired_gap_refuses_rows_on_different_items(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="not the same items"):
        bench.paired_gap("101", "10", seed=1)
