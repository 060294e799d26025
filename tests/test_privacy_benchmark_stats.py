"""The statistics benchmarks/privacy.py reports against the issue's goals: canary exposure, the
membership attack's AUC and the paired gap to the no-DP row, on inputs whose answers are known."""

from __future__ import annotations

import importlib
import json
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


def test_a_torn_line_in_the_stored_rows_costs_that_row_only(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    good = {"settings": {"seed": 1}, "row": {"epsilon": 8.0, "accuracy": 70.0}}
    out.write_text(
        json.dumps(good)
        + "\n"
        + '{"settings": {"seed": 1}, "row": {"eps'
        + "\n"  # killed mid-write
        + json.dumps({"settings": 3, "row": {}})
        + "\n\n"
        + json.dumps(good)
        + "\n"
        + json.dumps({"settings": {"seed": 1}, "row": {"accuracy": 70.0}})  # no epsilon
        + "\n"
    )
    assert bench.read_rows(out) == [good, good]
    assert bench.read_rows(tmp_path / "absent.jsonl") == []
    assert bench.shares({"neutral": 82.0, "negative": 9.1}) == "9.1 / 82.0 / 0.0"


def _rec(lr: float, eps: float | None, correct: str, **extra: object) -> dict[str, object]:
    settings = {"seed": 11, "eval_limit": len(correct), "rank": 4, "lr_max": lr, "lr_min": lr / 10, **extra}
    acc = 100 * correct.count("1") / len(correct)
    row = {"epsilon": eps, "accuracy": acc, "macro_f1": acc, "correct": correct}
    return {"settings": settings, "row": row}


def test_the_goal_compares_dp_and_no_dp_each_at_its_own_best_lr(bench: ModuleType) -> None:
    n = 1000
    records = [
        _rec(1e-2, None, "1" * 677 + "0" * 323),  # no DP collapsed at the high lr
        _rec(1e-2, 8.0, "1" * 743 + "0" * 257),
        _rec(3e-3, None, "1" * 780 + "0" * 220),  # the best no-DP row
        _rec(3e-3, 8.0, "1" * 700 + "0" * 300),
        _rec(3e-3, 8.0, "1" * 900 + "0" * 100, rank=16),  # another shape: not compared
        {"settings": _rec(3e-3, None, "1" * n)["settings"],
         "row": {"epsilon": None, "private_training": False, "accuracy": 100.0, "macro_f1": 1.0,
                 "correct": "1" * n}},  # the public start alone: not a no-DP row
    ]  # fmt: skip
    shape = {"seed": 11, "eval_limit": n, "rank": 4, "lr_max": 3e-3, "lr_min": 3e-4}
    grid = bench.lr_grid(records, shape, 11)
    assert len(grid["cells"]) == 4 and all(c["predicted"] == {} for c in grid["cells"])
    (best,) = grid["best_vs_best"]
    # Best no DP 78.0 (lr 3e-3) against best DP 74.3 (lr 1e-2): 3.7 points, the interval around it.
    assert best["no_dp_lr"][0] == 3e-3 and best["dp_lr"][0] == 1e-2
    assert best["gap"] == 3.7 and best["ci95"][0] < 3.7 < best["ci95"][1]
    same = {g["lr"][0]: g["gap"] for g in grid["same_lr"]}
    assert same == {1e-2: -6.6, 3e-3: 8.0}
    # Without a no-DP row of this shape there is nothing to compare against.
    assert bench.lr_grid(records[1:2], records[1]["settings"], 11)["best_vs_best"] == []
