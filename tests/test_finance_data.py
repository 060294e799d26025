"""`silotune data finance`: no evaluation item in the training rows, counts, label mapping per
source; the by-source split; the finance recipe's prompt, EOS and pad token."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evaluation.benchmarks import DataSource
from evaluation.benchmarks.finance import load_fiqa, load_fpb, load_tfns
from evaluation.finance_data import build_finance_data, evaluation_texts, normalise, write_finance_data
from silo_node.ops.split import split_file, split_indices
from silotune.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "tfns").is_dir(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def shared_data():
    return build_finance_data(DataSource(root=SHARED))


@needs_shared
def test_no_evaluation_item_is_in_the_training_rows(shared_data) -> None:
    held_out = set()
    for load in (load_fpb, load_fiqa, load_tfns):
        held_out |= {
            normalise(i.prompt.split("\nInput: ")[1].rsplit("\nAnswer: ")[0])
            for i in load(DataSource(root=SHARED))
        }
    assert len(held_out) == shared_data.evaluation_texts > 3800
    trained = {normalise(r["input"]) for r in shared_data.all_records()}
    assert not trained & held_out


@needs_shared
def test_counts_per_source_and_what_was_dropped(shared_data) -> None:
    got = {r.source: (r.read, r.test_split, r.leaked, r.kept) for r in shared_data.reports}
    # FPB 4,846 - 1,212 test; FiQA 1,213 - 304 test; TFNS train 9,543. Dropped: rows whose text
    # equals an evaluation item's (FPB duplicates, FiQA's same sentence under several aspects).
    assert got["fpb"][:2] == (4846, 1212) and got["fiqa"][:2] == (1213, 304) and got["tfns"][:2] == (9543, 0)
    assert got["fpb"][3] + got["fpb"][2] == 4846 - 1212
    assert got["fiqa"][3] + got["fiqa"][2] == 1213 - 304
    assert got["tfns"][3] + got["tfns"][2] == 9543
    assert all(0 < r.leaked < 100 for r in shared_data.reports)


@needs_shared
def test_tfns_labels_are_bearish_negative_bullish_positive(shared_data) -> None:
    with open(SHARED / "tfns" / "sent_train.csv", encoding="utf-8", newline="") as f:
        raw = {normalise(r["text"]): int(r["label"]) for r in csv.DictReader(f)}
    expected = {0: "negative", 1: "positive", 2: "neutral"}
    for rec in shared_data.records["tfns"][:500]:
        assert rec["output"] == expected[raw[normalise(rec["input"])]]
        assert "this tweet?" in rec["instruction"]
    assert all("this news?" in r["instruction"] for r in shared_data.records["fpb"])
    fiqa_kinds = {r["instruction"] for r in shared_data.records["fiqa"]}
    assert len(fiqa_kinds) == 2  # posts are tweets, headlines news, as the evaluation asks


def _fake_ingredients(root: Path) -> None:
    """A tiny tree in the ../shared/data layout, where one FPB test sentence also appears in the
    rows that would be training rows, spelled differently (case, spacing, punctuation)."""
    fpb = root / "fpb" / "FinancialPhraseBank-v1.0"
    fpb.mkdir(parents=True)
    lines = [
        f"Company {i} reported results for quarter {i} .@{['negative', 'neutral', 'positive'][i % 3]}"
        for i in range(12)
    ]
    fpb.joinpath("Sentences_50Agree.txt").write_text("\n".join(lines) + "\n", encoding="iso-8859-1")
    fiqa = root / "fiqa"
    fiqa.mkdir()
    for name, rows in (("fiqa_train.csv", 6), ("fiqa_validation.csv", 1), ("fiqa_test.csv", 1)):
        with open(fiqa / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "sentiment_score", "format"])
            for i in range(rows):
                w.writerow([f"{name} post {i}", -0.5 + 0.25 * i, "post" if i % 2 else "headline"])
    tfns = root / "tfns"
    tfns.mkdir()
    with open(tfns / "sent_valid.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["valid tweet one", 0], ["valid tweet two", 2]])
    # The test split of the fake FPB is computed below; TFNS train gets one of its sentences too.
    test_sentences = [
        i.prompt.split("\nInput: ")[1].rsplit("\nAnswer: ")[0] for i in load_fpb(DataSource(root=root))
    ]
    copy = "  " + test_sentences[0].upper().replace(" .", "!!") + " "
    with open(tfns / "sent_train.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(
            [
                ["text", "label"],
                ["train tweet a", 0],
                ["train tweet b", 1],
                [copy, 2],
                ["VALID tweet one.", 1],
            ]
        )


def test_a_training_row_equal_to_an_evaluation_item_is_dropped_and_counted(tmp_path: Path) -> None:
    _fake_ingredients(tmp_path)
    data = build_finance_data(DataSource(root=tmp_path))
    tfns = next(r for r in data.reports if r.source == "tfns")
    assert (tfns.read, tfns.leaked, tfns.kept) == (4, 2, 2)
    assert [r["input"] for r in data.records["tfns"]] == ["train tweet a", "train tweet b"]
    assert [r["output"] for r in data.records["tfns"]] == ["negative", "positive"]
    fpb = next(r for r in data.reports if r.source == "fpb")
    assert (fpb.read, fpb.test_split, fpb.kept) == (12, 3, 9)
    assert not {normalise(r["input"]) for r in data.all_records()} & evaluation_texts(
        DataSource(root=tmp_path)
    )
    written = write_finance_data(data, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "finance-train.report.json").read_text())
    assert report["total"] == len(data.all_records()) and len(written) == 5
    combined = (tmp_path / "out" / "finance-train.jsonl").read_text().splitlines()
    assert {json.loads(line)["source"] for line in combined} == {"fpb", "fiqa", "tfns"}


def test_split_by_column_gives_each_value_its_own_silo(tmp_path: Path) -> None:
    labels = ["tfns", "fpb", "tfns", "fiqa", "fpb"]
    assert split_indices(5, 3, "column", 0, labels) == [[3], [1, 4], [0, 2]]
    with pytest.raises(UserError, match="makes 3 silos, not 2"):
        split_indices(5, 2, "column", 0, labels)
    src = tmp_path / "all.jsonl"
    src.write_text(
        "".join(
            json.dumps({"input": f"t{i}", "output": "neutral", "source": s}) + "\n"
            for i, s in enumerate(labels)
        )
    )
    written = split_file(src, tmp_path / "silos", 0, "column", label_column="source")
    assert [(p.name, n) for p, n, _ in written] == [
        ("silo-fiqa.jsonl", 1),
        ("silo-fpb.jsonl", 2),
        ("silo-tfns.jsonl", 2),
    ]


def test_jsonl_with_a_unicode_line_separator_inside_a_string_reads_as_one_row(tmp_path: Path) -> None:
    from silo_node.app.data import read_records

    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"input": "up\u2028down", "output": "neutral"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    assert read_records(path) == [{"input": "up\u2028down", "output": "neutral"}]
