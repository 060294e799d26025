"""Answer extraction (FlowerTune's rules), accuracy, pass@k, and oracle/constant predictors."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluation.benchmarks import SUITES, DataSource, get_benchmark  # noqa: E402
from evaluation.extraction import choice_label, sentiment_label, stop_at_stop_words  # noqa: E402
from evaluation.sandbox import SandboxLimits, run_program  # noqa: E402
from evaluation.scoring import (  # noqa: E402
    BenchmarkResult,  # noqa: E402
    accuracy,
    domain_average,
    mean_pass_at_1,
    pass_at_k,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared benchmark data absent ({DATA})")
CHOICE = [b for s in ("general", "finance", "medical") for b in SUITES[s]]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("positive", "positive"),
        ("Positive.", "positive"),
        ("The sentiment of this news is negative, because sales fell.", "negative"),
        ("I would say neutral", "neutral"),
        ("", "neutral"),  # FlowerTune: anything without positive/negative is neutral
        ("not positive, rather negative", "positive"),  # positive is checked first
    ],
)
def test_sentiment_extraction(output: str, expected: str) -> None:
    assert sentiment_label(output) == expected
    assert choice_label(output, "sentiment") == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "b"),
        ("b", "b"),  # lower case
        (" C", "c"),
        ("D. Local anesthesia is effective only when ...", "d"),  # letter with its option text
        ("A) because the other options are wrong", "a"),  # extra words after the letter
        ("(c)", "c"),
        ("\n## B\nexplanation", "b"),
        # FlowerTune reads the FIRST character: a sentence before the letter is wrong.
        ("The answer is B", "the answer is b"),
    ],
)
def test_mcq_extraction(output: str, expected: str) -> None:
    assert choice_label(output, "mcq") == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("no", "no"),
        ("NO", "no"),
        ("maybe", "maybe"),  # verbatim fallback matches the gold "maybe"
        ("yes yes", "yes yes"),  # two words are not one answer
        ("yesyes", "yes"),
    ],
)
def test_boolean_extraction(output: str, expected: str) -> None:
    assert choice_label(output, "boolean") == expected


def test_stop_words_cut_at_first() -> None:
    assert stop_at_stop_words("    return 1\n\ndef g():\n#x", ("\n#", "\ndef")) == "    return 1\n"
    assert stop_at_stop_words("abc", ("\n}",)) == "abc"


def test_accuracy_and_pass_at_k() -> None:
    assert accuracy(["a", "b", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], [])
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - (7 * 6 * 5 * 4 * 3) / (10 * 9 * 8 * 7 * 6))
    assert mean_pass_at_1([[True], [False], [True, False]]) == pytest.approx(0.5)
    results = [BenchmarkResult("x", "X", "accuracy", v, 1) for v in (0.2, 0.4, 0.9)]
    assert domain_average(results) == pytest.approx(0.5)


@needs_data
@pytest.mark.parametrize("name", [b.name for b in CHOICE])
def test_oracle_scores_100_and_constant_scores_class_share(name: str) -> None:
    bench = get_benchmark(name)
    items = bench.load(DataSource(root=DATA))[:400]
    golds = [it.gold for it in items]
    assert bench.answer_type is not None
    # Oracle: writes exactly the answer a model should write for the gold label.
    oracle = [choice_label(it.answers[it.labels.index(it.gold)], bench.answer_type) for it in items]
    assert accuracy(oracle, golds) == 1.0
    # Constant predictor: always the first label; scores that label's share of the items.
    first = items[0].answers[0]
    constant = [choice_label(first, bench.answer_type) for _ in items]
    share = Counter(golds)[items[0].labels[0]] / len(items)
    assert accuracy(constant, golds) == pytest.approx(share)


@needs_data
@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_code_oracle_passes(name: str) -> None:
    tasks = get_benchmark(name).load(DataSource(root=DATA))[:3]
    results = []
    for t in tasks:
        assert t.reference is not None
        r = run_program(t.language, t.program(t.reference), SandboxLimits(timeout_s=10))
        results.append([r.passed])
    assert mean_pass_at_1(results) == 1.0
    wrong = run_program(tasks[0].language, tasks[0].program("    return None\n"), SandboxLimits(timeout_s=10))
    assert not wrong.passed


@needs_data
def test_multiple_e_programs_assemble() -> None:
    src = DataSource(root=DATA)
    js = next(t for t in get_benchmark("multiple_js").load(src) if t.id == "HumanEval_23_strlen")
    cpp = next(t for t in get_benchmark("multiple_cpp").load(src) if t.id == "HumanEval_23_strlen")
    assert run_program("js", js.program("\n  return string.length;\n}\n")).passed
    # The C++ tests begin with the "}" that the stop word "\n}" removed from the completion.
    assert run_program("cpp", cpp.program("\n    return string.size();")).passed
    assert not run_program("cpp", cpp.program("\n    return 7;")).passed


def test_macro_f1_tells_the_prior_from_the_task() -> None:
    from evaluation.scoring import macro_f1, majority_baseline

    golds = ["neutral"] * 6 + ["positive"] * 2 + ["negative"] * 2
    always = ["neutral"] * 10
    # Always-majority: high accuracy, but F1 only on one of three labels.
    assert majority_baseline(golds) == pytest.approx({"accuracy": 0.6, "macro_f1": (2 * 0.6 / 1.6) / 3})
    assert macro_f1(always, golds) == pytest.approx((2 * 0.6 / 1.6) / 3)
    assert macro_f1(golds, golds) == 1.0
    # One positive found, one false positive: precision 1/2, recall 1/2 for "positive".
    preds = ["neutral"] * 5 + ["positive"] + ["positive", "neutral"] + ["negative"] * 2
    f1_neutral = 2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6)
    assert macro_f1(preds, golds) == pytest.approx((f1_neutral + 0.5 + 1.0) / 3)
    # Unparseable outputs cost recall only; no label outside the gold set is invented.
    assert macro_f1(["the"] * 10, golds) == 0.0
    with pytest.raises(ValueError):
        macro_f1(["a"], ["a", "b"])


def test_label_recall_shows_which_labels_are_found() -> None:
    from evaluation.scoring import label_recall

    golds = ["neutral"] * 6 + ["positive"] * 2 + ["negative"] * 2
    assert label_recall(golds, golds) == {"negative": 1.0, "neutral": 1.0, "positive": 1.0}
    # A constant predictor finds its own label and nothing else.
    assert label_recall(["positive"] * 10, golds) == {"negative": 0.0, "neutral": 0.0, "positive": 1.0}
    preds = ["neutral"] * 3 + ["negative"] * 3 + ["positive", "neutral"] + ["negative", "x"]
    assert label_recall(preds, golds) == {"negative": 0.5, "neutral": 0.5, "positive": 0.5}
    with pytest.raises(ValueError):
        label_recall(["a"], ["a", "b"])


def test_prediction_shares_cover_every_label() -> None:
    from evaluation.scoring import prediction_shares

    labels = ("negative", "neutral", "positive")
    preds = ["positive"] * 6 + ["neutral"] * 2
    # A label never predicted is listed with 0; the shares sum to 1.
    assert prediction_shares(preds, labels) == {"negative": 0.0, "neutral": 0.25, "positive": 0.75}
    # Anything outside the label set keeps its own key (sorted after the labels).
    assert prediction_shares(["a", "x", "x", "b"], ("a", "b")) == {"a": 0.25, "b": 0.25, "x": 0.5}
    assert prediction_shares([], labels) == {"negative": 0.0, "neutral": 0.0, "positive": 0.0}


def test_constant_baselines_and_their_suite_average() -> None:
    from evaluation.scoring import average_constant_baselines, constant_baselines

    labels = ("negative", "neutral", "positive")
    golds = ["neutral"] * 6 + ["positive"] * 3 + ["negative"]
    assert constant_baselines(golds, labels) == pytest.approx(
        {"negative": 0.1, "neutral": 0.6, "positive": 0.3}
    )
    # Equal to scoring the constant prediction, label by label.
    for label in labels:
        assert constant_baselines(golds, labels)[label] == accuracy([label] * len(golds), golds)
    assert constant_baselines([], labels) == {"negative": 0.0, "neutral": 0.0, "positive": 0.0}
    a = BenchmarkResult(
        "a", "A", "accuracy", 0.5, 10, extra={"constant_baselines": {"neutral": 0.6, "positive": 0.3}}
    )
    b = BenchmarkResult(
        "b", "B", "accuracy", 0.5, 4, extra={"constant_baselines": {"neutral": 0.0, "positive": 1.0}}
    )
    code = BenchmarkResult("c", "C", "pass@1", 0.5, 4)  # has none: left out of the average
    # Unweighted over benchmarks, like the domain score (not weighted by n).
    assert average_constant_baselines([a, b, code]) == pytest.approx({"neutral": 0.3, "positive": 0.65})
    assert average_constant_baselines([code]) == {}


@needs_data
def test_constant_baselines_on_the_full_finance_suite() -> None:
    """The figures docs/evaluation.md quotes: always-neutral 44.54, always-positive 35.77."""
    from evaluation.scoring import average_constant_baselines, constant_baselines

    results = []
    for bench in SUITES["finance"]:
        golds = [it.gold for it in bench.load(DataSource(root=DATA))]
        table = constant_baselines(golds, ("negative", "neutral", "positive"))
        results.append(
            BenchmarkResult(
                bench.name, bench.title, "accuracy", 0.0, len(golds), extra={"constant_baselines": table}
            )
        )
    assert [r.n for r in results] == [1212, 304, 2388]
    average = average_constant_baselines(results)
    assert round(100 * average["neutral"], 2) == 44.54
    assert round(100 * average["positive"], 2) == 35.77
    assert round(100 * average["negative"], 2) == 19.69
