"""FlowerTune-style finance training data, built offline from its ingredients, with no test leak.

FlowerTune trains on ``fingpt-sentiment-train``, which FinGPT built from FPB, FiQA, TFNS (and NWGI)
train rows wrapped in an instruction. That set cannot be fetched offline, and it leaks: its FiQA
part uses a 0.226 split with the same seed as the leaderboard's 0.25 test split, so 29 of the 304
FiQA test items are in it, 21 times each (docs/evaluation.md). This module rebuilds the training
rows from the ingredients instead:

- FPB ``sentences_50agree`` rows outside the 1,212-item test split (the split FlowerTune evaluates);
- FiQA (train + validation + test concatenated) rows outside the 304-item test split;
- TFNS train (its validation split is the test set).

Then every row whose normalised text equals the normalised text of ANY finance evaluation item
(all three sets) is dropped, and the count is reported: the proof that no evaluation item is
trained on, checked on the text itself rather than trusted from the split.

Records carry FinGPT's instruction wording (news / tweet, as the evaluation asks) and a ``source``
field, which is what a federation split by source reads (``silotune data split --method column``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.benchmarks.base import DataSource, hub_rows, read_csv
from evaluation.benchmarks.finance import FIQA_RAW, FPB_RAW, fiqa_label, load_fiqa, load_fpb, load_tfns
from silo_node.app.templates import FINGPT_INSTRUCTION, FINGPT_TWEET_INSTRUCTION
from silotune.atomic_files import atomic_write_text
from silotune.errors import DataError

SOURCES = ("fpb", "fiqa", "tfns")
TFNS_TRAIN = "tfns/sent_train.csv"
# TFNS: 0 bearish, 1 bullish, 2 neutral (FinGPT's making_data.ipynb; one public copy of the script
# maps it 0/1/2 = negative/neutral/positive, which is wrong).
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}
FPB_LABELS = ("negative", "neutral", "positive")
TEST_SIZE = 0.25  # FlowerTune's FPB and FiQA test splits: train_test_split(0.25, seed=42)
COMBINED_FILE = "finance-train.jsonl"
REPORT_FILE = "finance-train.report.json"


def normalise(text: str) -> str:
    """The text a leak check compares: NFKC, lower case, every run of non-alphanumerics one space.

    Catches copies that differ only in case, spacing, punctuation or Unicode form (FPB's latin-1
    export and the hub's UTF-8 one write some quotes differently).
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", " ", text).strip()


@dataclass
class SourceReport:
    """What happened to one source's rows on the way to the training set."""

    source: str
    read: int  # rows in the ingredient files
    test_split: int  # rows that are the source's own test split (never candidates)
    leaked: int  # candidates dropped because their text equals some evaluation item's
    kept: int
    labels: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "read": self.read,
            "test_split": self.test_split,
            "dropped_as_evaluation_text": self.leaked,
            "kept": self.kept,
            "labels": self.labels,
        }


@dataclass
class FinanceData:
    records: dict[str, list[dict[str, str]]]  # source -> training records
    reports: list[SourceReport]
    evaluation_texts: int  # distinct normalised texts of the evaluation items

    def all_records(self) -> list[dict[str, str]]:
        return [r for s in SOURCES for r in self.records[s]]


def _record(text: str, label: str, source: str, tweet: bool) -> dict[str, str]:
    instruction = FINGPT_TWEET_INSTRUCTION if tweet else FINGPT_INSTRUCTION
    return {"instruction": instruction, "input": text.strip(), "output": label, "source": source}


def _train_split(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """FlowerTune's ``train_test_split(0.25, seed=42)``: the train side, and the test size."""
    from datasets import Dataset

    parts = Dataset.from_list(rows).train_test_split(TEST_SIZE, seed=42)
    return [dict(r) for r in parts["train"]], len(parts["test"])


def _fpb_rows(source: DataSource) -> list[dict[str, Any]]:
    if source.root is None:
        return hub_rows("fpb", "takala/financial_phrasebank", "sentences_50agree", "train")
    path = source.find("fpb", FPB_RAW)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="iso-8859-1").splitlines(), 1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        if not sep or label.strip() not in FPB_LABELS:
            raise DataError(f"fpb: {path}:{lineno}: expected 'sentence@negative|neutral|positive'")
        rows.append({"sentence": sentence, "label": FPB_LABELS.index(label.strip())})
    return rows


def _fiqa_rows(source: DataSource) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if source.root is None:
        for split in ("train", "validation", "test"):
            rows += hub_rows("fiqa", "pauri32/fiqa-2018", None, split)
    else:
        for rel in FIQA_RAW:
            rows += read_csv(source.find("fiqa", rel), "fiqa", ("sentence", "sentiment_score", "format"))
    out = []
    for i, r in enumerate(rows):
        try:
            score = float(r["sentiment_score"])
        except (TypeError, ValueError):
            raise DataError(
                f"fiqa: row {i + 1}: sentiment_score {r.get('sentiment_score')!r} is not a number"
            ) from None
        out.append({"sentence": r["sentence"], "sentiment_score": score, "format": r["format"]})
    return out


def _tfns_rows(source: DataSource) -> list[dict[str, Any]]:
    if source.root is None:
        return hub_rows("tfns", "zeroshot/twitter-financial-news-sentiment", None, "train")
    return read_csv(source.find("tfns", TFNS_TRAIN), "tfns", ("text", "label"))


def evaluation_texts(source: DataSource) -> set[str]:
    """Normalised texts of every finance evaluation item (FPB 1,212, FiQA 304, TFNS 2,388)."""
    texts = set()
    for load in (load_fpb, load_fiqa, load_tfns):
        for item in load(source):
            # The loaders render FlowerTune's prompt; the input text sits between its two cues.
            body = item.prompt.split("\nInput: ", 1)[1].rsplit("\nAnswer: ", 1)[0]
            texts.add(normalise(body))
    return texts


def _candidates(source: DataSource) -> dict[str, tuple[list[dict[str, str]], int, int]]:
    """source -> (training candidates, rows read, rows in that source's test split)."""
    fpb = _fpb_rows(source)
    fpb_train, fpb_test = _train_split(fpb)
    fiqa = _fiqa_rows(source)
    fiqa_train, fiqa_test = _train_split(fiqa)
    tfns = _tfns_rows(source)
    tfns_records = []
    for i, r in enumerate(tfns):
        try:
            label = TFNS_LABELS[int(r["label"])]
        except (KeyError, ValueError):
            raise DataError(
                f"tfns: {TFNS_TRAIN} row {i + 2}: label must be 0, 1 or 2, got {r.get('label')!r}"
            ) from None
        tfns_records.append(_record(r["text"], label, "tfns", tweet=True))
    return {
        "fpb": (
            [_record(r["sentence"], FPB_LABELS[int(r["label"])], "fpb", tweet=False) for r in fpb_train],
            len(fpb),
            fpb_test,
        ),
        "fiqa": (
            [
                _record(r["sentence"], fiqa_label(float(r["sentiment_score"])), "fiqa", r["format"] == "post")
                for r in fiqa_train
            ],
            len(fiqa),
            fiqa_test,
        ),
        "tfns": (tfns_records, len(tfns), 0),
    }


def build_finance_data(source: DataSource) -> FinanceData:
    """Every source's training records, with every row whose text is an evaluation item's dropped."""
    held_out = evaluation_texts(source)
    records: dict[str, list[dict[str, str]]] = {}
    reports = []
    for name, (rows, read, test_split) in _candidates(source).items():
        kept = [r for r in rows if r["input"] and normalise(r["input"]) not in held_out]
        records[name] = kept
        reports.append(
            SourceReport(
                name, read, test_split, len(rows) - len(kept), len(kept),
                dict(sorted(Counter(r["output"] for r in kept).items())),
            )
        )  # fmt: skip
    leaks = sum(normalise(r["input"]) in held_out for rs in records.values() for r in rs)
    assert leaks == 0, "a training row equals an evaluation item"  # the filter above guarantees it
    return FinanceData(records, reports, len(held_out))


def write_finance_data(data: FinanceData, out_dir: Path) -> list[Path]:
    """``<source>.jsonl`` per source, the combined file, and a JSON report; all written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SOURCES:
        written.append(_write_jsonl(out_dir / f"{name}.jsonl", data.records[name]))
    written.append(_write_jsonl(out_dir / COMBINED_FILE, data.all_records()))
    report = {
        "sources": [r.as_dict() for r in data.reports],
        "evaluation_texts_checked": data.evaluation_texts,
        "training_rows_equal_to_an_evaluation_item": 0,
        "total": sum(r.kept for r in data.reports),
    }
    path = out_dir / REPORT_FILE
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    written.append(path)
    return written


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
