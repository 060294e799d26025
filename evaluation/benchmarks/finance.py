"""Finance: FPB, FiQA and TFNS sentiment accuracy, on FlowerTune's evaluation splits.

Prompt (FlowerTune finance/utils.py ``format_example``)::

    Instruction: What is the sentiment of this news? Please choose an answer from {negative/...}.
    Input: <sentence>
    Answer:_            <- ends with a space, as FlowerTune's does
"""

from __future__ import annotations

from typing import Any

from evaluation.benchmarks.base import (
    Benchmark,
    DataSource,
    hub_rows,
    need,
    read_csv,
    read_jsonl,
    seeded_test_split,
)
from evaluation.items import ChoiceItem
from silo_node.app.templates import instruction_answer_prompt
from silotune.errors import DataError

LABELS = ("negative", "neutral", "positive")
_NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
_TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."

TFNS_FILE = "tfns/sent_valid.csv"
FPB_FILE = "fpb/derived/fpb_sentences50agree_test_seed42.jsonl"
FPB_RAW = "fpb/FinancialPhraseBank-v1.0/Sentences_50Agree.txt"
FIQA_FILE = "fiqa/derived/fiqa_test_flowertune_seed42.jsonl"
FIQA_RAW = ("fiqa/fiqa_train.csv", "fiqa/fiqa_validation.csv", "fiqa/fiqa_test.csv")


def _item(item_id: str, instruction: str, text: str, gold: str) -> ChoiceItem:
    # The same function renders training prompts under train.prompt-style = "eval".
    return ChoiceItem(item_id, instruction_answer_prompt(instruction, text), gold, LABELS, LABELS)


# --- TFNS: validation split, label 0 bearish/negative, 1 bullish/positive, 2 neutral -------------
_TFNS_LABEL = {0: "negative", 1: "positive", 2: "neutral"}


def load_tfns(source: DataSource) -> list[ChoiceItem]:
    if source.root is not None:
        rows: list[dict[str, Any]] = read_csv(source.find("tfns", TFNS_FILE), "tfns", ("text", "label"))
    else:
        rows = hub_rows("tfns", "zeroshot/twitter-financial-news-sentiment", None, "validation")
    items = []
    for i, row in enumerate(rows):
        try:
            gold = _TFNS_LABEL[int(row["label"])]
        except (KeyError, ValueError):
            raise DataError(f"tfns: row {i + 2}: label must be 0, 1 or 2, got {row.get('label')!r}") from None
        items.append(_item(f"tfns-{i}", _TWEET, row["text"], gold))
    return items


# --- FPB: sentences_50agree, 25% test split with seed 42 -----------------------------------------
_FPB_LABEL = {0: "negative", 1: "neutral", 2: "positive"}


def _fpb_rows_from_raw(source: DataSource) -> list[dict[str, Any]]:
    # Mirrors HF financial_phrasebank: latin-1, "sentence@label", label names -> 0/1/2.
    path = source.find("fpb", FPB_RAW)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="iso-8859-1").splitlines(), 1):
        if not line.strip():
            continue
        if "@" not in line:
            raise DataError(f"fpb: {path}:{lineno}: expected 'sentence@label'")
        sentence, label = line.rsplit("@", 1)
        if label.strip() not in LABELS:
            raise DataError(f"fpb: {path}:{lineno}: unknown label {label.strip()!r}")
        rows.append({"sentence": sentence, "label": LABELS.index(label.strip())})
    return seeded_test_split(rows, 0.25)


def load_fpb(source: DataSource) -> list[ChoiceItem]:
    if source.root is not None:
        if source.exists(FPB_FILE) or not source.exists(FPB_RAW):
            rows = read_jsonl(source.find("fpb", FPB_FILE, FPB_RAW), "fpb")
        else:
            rows = _fpb_rows_from_raw(source)
    else:
        raw = hub_rows("fpb", "takala/financial_phrasebank", "sentences_50agree", "train")
        rows = seeded_test_split(raw, 0.25)
    items = []
    for i, row in enumerate(rows):
        need(row, ("sentence", "label"), "fpb", f"row {i + 1}")
        items.append(_item(f"fpb-{row.get('idx', i)}", _NEWS, row["sentence"], _FPB_LABEL[int(row["label"])]))
    return items


# --- FiQA: train+validation+test concatenated, 25% test split with seed 42 -----------------------
def fiqa_label(score: float) -> str:
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def _fiqa_rows_from_raw(source: DataSource) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rel in FIQA_RAW:
        for r in read_csv(source.find("fiqa", rel), "fiqa", ("sentence", "sentiment_score", "format")):
            rows.append(
                {
                    "sentence": r["sentence"],
                    "sentiment_score": float(r["sentiment_score"]),
                    "format": r["format"],
                }
            )
    return seeded_test_split(rows, 0.25)


def load_fiqa(source: DataSource) -> list[ChoiceItem]:
    if source.root is not None:
        if source.exists(FIQA_FILE) or not source.exists(FIQA_RAW[0]):
            rows = read_jsonl(source.find("fiqa", FIQA_FILE, *FIQA_RAW), "fiqa")
        else:
            rows = _fiqa_rows_from_raw(source)
    else:
        raw = []
        for split in ("train", "validation", "test"):
            raw += hub_rows("fiqa", "pauri32/fiqa-2018", None, split)
        rows = seeded_test_split(raw, 0.25)
    items = []
    for i, row in enumerate(rows):
        need(row, ("sentence", "sentiment_score", "format"), "fiqa", f"row {i + 1}")
        instruction = _TWEET if row["format"] == "post" else _NEWS
        items.append(
            _item(f"fiqa-{i}", instruction, row["sentence"], fiqa_label(float(row["sentiment_score"])))
        )
    return items


BENCHMARKS = (
    Benchmark(
        "fpb",
        "FPB",
        "finance",
        "choice",
        load_fpb,
        "sentiment",
        "takala/financial_phrasebank (sentences_50agree)",
        (FPB_FILE,),
    ),
    Benchmark("fiqa", "FiQA", "finance", "choice", load_fiqa, "sentiment", "pauri32/fiqa-2018", (FIQA_FILE,)),
    Benchmark(
        "tfns",
        "TFNS",
        "finance",
        "choice",
        load_tfns,
        "sentiment",
        "zeroshot/twitter-financial-news-sentiment",
        (TFNS_FILE,),
    ),
)
