"""Metrics: accuracy for closed answers, pass@k for code, and the leaderboard's averages."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any, Literal

Metric = Literal["accuracy", "pass@1"]


@dataclass
class BenchmarkResult:
    """One benchmark's score plus the per-item records that produced it."""

    name: str
    title: str
    metric: Metric
    value: float  # fraction in [0, 1]
    n: int
    records: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "metric": self.metric,
            "value": self.value,
            "n": self.n,
            **self.extra,
        }


def _same_length(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")


def _label_counts(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Per gold label, sorted: (true positives, times predicted, times gold), in one pass."""
    _same_length(predictions, golds)
    hits = Counter(g for p, g in zip(predictions, golds, strict=True) if p == g)
    predicted, gold = Counter(predictions), Counter(golds)
    return {c: (hits[c], predicted[c], gold[c]) for c in sorted(gold)}


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Share of exact matches; 0.0 for an empty set (reported with n=0, never as a real score)."""
    _same_length(predictions, golds)
    if not golds:
        return 0.0
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / len(golds)


def macro_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Unweighted mean F1 over the gold label set; any other prediction only costs recall.

    Reported beside accuracy because the closed-answer sets are imbalanced (TFNS is ~65 %
    neutral): a model that always answers the majority label scores high accuracy and a macro-F1
    near 1/3 x 0.8, so the two together tell "learned the task" from "learned the prior".
    """
    counts = _label_counts(predictions, golds)
    if not counts:
        return 0.0
    total = 0.0
    for tp, predicted, actual in counts.values():
        if tp:
            precision, recall = tp / predicted, tp / actual
            total += 2 * precision * recall / (precision + recall)
    return total / len(counts)


def label_recall(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Recall of each gold label (sorted): which labels a model finds, not only how many items.

    On label-skewed silos this is the telling figure: a silo that never saw "positive" tweets
    scores 0 % recall on them whatever its accuracy, and federation is what can fix that.
    """
    return {c: tp / actual for c, (tp, _, actual) in _label_counts(predictions, golds).items()}


def majority_accuracy(golds: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent gold label: the floor a classifier must beat."""
    if not golds:
        return 0.0
    return max(golds.count(g) for g in set(golds)) / len(golds)


def majority_baseline(golds: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of always answering the most frequent gold label."""
    if not golds:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    top = max(sorted(set(golds)), key=golds.count)
    return {"accuracy": majority_accuracy(golds), "macro_f1": macro_f1([top] * len(golds), golds)}


def prediction_shares(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Share of items predicted as each label (every label listed, zeros included).

    Accuracy alone hides a collapsed model: a 135M model that answers "positive" 97 % of the time
    still scores 60 % on FiQA, whose items are 60 % positive. Any prediction outside ``labels``
    gets its own key, so the shares always sum to 1.
    """
    if not predictions:
        return {label: 0.0 for label in labels}
    counts = Counter(predictions)
    others = sorted(set(counts) - set(labels))
    return {label: counts[label] / len(predictions) for label in (*labels, *others)}


def constant_baselines(golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy of always giving each label, on exactly the items scored (label -> accuracy).

    The floor any finance score must be read against: on FlowerTune's full sets always-"neutral"
    averages 44.54 and always-"positive" 35.77, above several leaderboard rows.
    """
    counts = Counter(golds)
    return {label: counts[label] / len(golds) if golds else 0.0 for label in labels}


def average_constant_baselines(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """Per label, the unweighted mean over benchmarks of its constant baseline (as the domain score
    averages benchmarks); benchmarks without ``constant_baselines`` in ``extra`` are left out."""
    tables = [r.extra["constant_baselines"] for r in results if "constant_baselines" in r.extra]
    if not tables:
        return {}
    labels = sorted({label for t in tables for label in t})
    return {label: sum(t.get(label, 0.0) for t in tables) / len(tables) for label in labels}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_1(passed: Sequence[Sequence[bool]]) -> float:
    """Average pass@1 over tasks, each with one or more samples."""
    if not passed:
        return 0.0
    return sum(pass_at_k(len(s), sum(s), 1) for s in passed) / len(passed)


def domain_average(results: Sequence[BenchmarkResult]) -> float:
    """FlowerTune's domain score: the unweighted mean of its benchmarks' scores."""
    if not results:
        return 0.0
    return sum(r.value for r in results) / len(results)
