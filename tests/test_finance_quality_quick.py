"""benchmarks/finance_quality.py --quick runs in CI: the real builder, split by source, the shipped
finance recipe through the round core, every row scored, and the JSON line the issue names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "tfns").is_dir(), reason="../shared/data not present")
def test_quick_benchmark_prints_every_figure_and_resumes(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "benchmarks/finance_quality.py", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("federated_avg", "best_isolated_avg", "centralized_avg", "base_avg", "communicated_mb"):
        assert isinstance(figures[key], (int, float)), key
    assert figures["communicated_mb"] > 0 and figures["total_steps"] == 3 * 2 * 1
    report = json.loads((tmp_path / "data" / "finance-train.report.json").read_text())
    assert report["training_rows_equal_to_an_evaluation_item"] == 0
    fed = json.loads((tmp_path / "federated" / "compare.json").read_text())
    assert fed["weighting"] == "equal" and [s["name"] for s in fed["silos"]] == [
        "silo-fiqa",
        "silo-fpb",
        "silo-tfns",
    ]
    # A second run measures nothing again: every row is taken from the first run's results.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("measured earlier") == 4
    assert json.loads(again.stdout.strip().splitlines()[-1])["federated_avg"] == figures["federated_avg"]


def _row(approach: str, label: str, avg: float, silo: str | None = None, mb: float = 0.0) -> dict:
    scores = {"fpb": avg, "fiqa": avg - 0.1, "tfns": avg + 0.1}
    return {
        "approach": approach, "label": label, "silo": silo, "scores": scores, "average": avg,
        "macro_f1": {k: v / 2 for k, v in scores.items()}, "total_steps": 150,
        "adapter_bytes": int(mb * 1e6), "train_seconds": 1.0, "eval_seconds": 2.0,
        "items": {"fpb": 1212, "fiqa": 304, "tfns": 2388},
    }  # fmt: skip


def test_summary_takes_each_figure_from_its_row(tmp_path: Path) -> None:
    """The JSON line's figures, from compare.json documents written as compare writes them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fq", REPO / "benchmarks" / "finance_quality.py")
    assert spec and spec.loader
    fq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fq)
    isolated = [
        _row("isolated", f"isolated silo-{s}", a, f"silo-{s}") for s, a in (("fpb", 0.5), ("tfns", 0.6))
    ]
    results = {
        "base-fp32": {"rows": [_row("base", "base (no training)", 0.3526)]},
        "federated": {"rows": [_row("fedavgm", "federated FedAvgM", 0.75, mb=588.1)], "eval_dtype": "bf16"},
        "centralized": {
            "rows": [_row("centralized", "centralized (pooled data)", 0.76)],
            "eval_dtype": "bf16",
        },
        "isolated": {
            "rows": [*isolated, _row("isolated", "isolated (mean of 2)", 0.55)],
            "eval_dtype": "bf16",
        },
        # An ablation: its label is the headline row's, so the table names it; the JSON keys it.
        "federated-20x5-int8": {
            "rows": [_row("fedavg", "federated FedAvg", 0.7396, mb=599.3)],
            "eval_dtype": "bf16",
        },
    }
    summary = fq.summarize(results, fq.recipe_options(False), 12.0, tmp_path)
    js = summary["json"]
    assert (js["federated_avg"], js["centralized_avg"], js["base_avg"]) == (75.0, 76.0, 35.26)
    assert js["best_isolated_avg"] == 60.0 and js["communicated_mb"] == 588.1 and js["rounds"] == 10
    text = fq.render(summary)
    assert "base (no training) (fp32 scoring)" in text and "federated FedAvgM |" in text
    assert js["federated_20x5_int8_avg"] == 73.96 and js["federated_20x5_int8_mb"] == 599.3
    assert "federated FedAvg [federated-20x5-int8] |" in text and "isolated_avg" not in js
