"""Every benchmark loader on the shared data folder: row counts from its README, well-formed fields."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evaluation.benchmarks import (  # noqa: E402
    SUITES,
    DataSource,
    finance,  # noqa: E402
    get_benchmark,
)
from evaluation.items import ChoiceItem, CodeTask  # noqa: E402
from silotune.errors import DataError, UserError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared benchmark data absent ({DATA})")

EXPECTED = {
    "tfns": 2388,
    "fpb": 1212,
    "fiqa": 304,
    "pubmedqa": 500,
    "medmcqa": 4183,
    "medqa": 1273,
    "careqa": 5621,
    "humaneval": 164,
    "mbpp": 500,
    "multiple_js": 161,
    "multiple_cpp": 161,
    # FlowerTune's MMLU categories over the 14,042 test questions.
    "mmlu_stem": 3153,
    "mmlu_social_sciences": 3077,
    "mmlu_humanities": 4705,
}


@pytest.fixture(scope="module")
def source() -> DataSource:
    return DataSource(root=DATA)


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_counts_and_fields(source: DataSource, name: str) -> None:
    bench = get_benchmark(name)
    items = bench.load(source)
    assert len(items) == EXPECTED[name]
    assert len({it.id for it in items}) == len(items), "ids must be unique"
    for it in items:
        if bench.kind == "choice":
            assert isinstance(it, ChoiceItem)
            assert it.prompt.strip() and it.gold in it.labels
        else:
            assert isinstance(it, CodeTask)
            assert it.prompt.strip() and it.tests.strip() and it.stop_words
    if bench.kind == "choice":
        # No benchmark is single-class: a loader that lost its labels would be.
        assert len(Counter(it.gold for it in items)) >= 2


@needs_data
def test_prompts_match_flowertune(source: DataSource) -> None:
    tfns = get_benchmark("tfns").load(source)[0]
    assert tfns.prompt.startswith(
        "Instruction: What is the sentiment of this tweet? Please "
        "choose an answer from {negative/neutral/positive}.\nInput: "
    )
    assert tfns.prompt.endswith("\nAnswer: ") and tfns.gold == "negative"
    med = get_benchmark("medqa").load(source)[0]
    assert med.prompt.startswith("<|im_start|>question\nYou are a medical doctor taking the US")
    assert "\n\nOptions:\nA. " in med.prompt
    assert med.prompt.endswith("\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n")
    pub = get_benchmark("pubmedqa").load(source)[0]
    assert pub.labels == ("yes", "no", "maybe")


@needs_data
def test_mmlu_limit_spreads_over_subjects(source: DataSource) -> None:
    bench = get_benchmark("mmlu_stem")
    picked = bench.take(bench.load(source), 19)
    assert len({it.group for it in picked}) == 19


@needs_data
def test_fpb_and_fiqa_derive_from_raw_files(source: DataSource, tmp_path: Path) -> None:
    # Without the derived files the loaders re-create FlowerTune's seed-42 split from the raw ones.
    for rel in (finance.FPB_RAW, *finance.FIQA_RAW):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((DATA / rel).read_bytes())
    raw = DataSource(root=tmp_path)
    for loader in (finance.load_fpb, finance.load_fiqa):
        derived = [(i.prompt, i.gold) for i in loader(source)]
        rebuilt = [(i.prompt, i.gold) for i in loader(raw)]
        assert rebuilt == derived


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tfns/sent_valid\.csv"):
        get_benchmark("tfns").load(DataSource(root=tmp_path))


def test_bad_column_is_reported(tmp_path: Path) -> None:
    (tmp_path / "tfns").mkdir()
    (tmp_path / "tfns" / "sent_valid.csv").write_text("tweet,label\nhello,0\n")
    with pytest.raises(DataError, match="missing column"):
        get_benchmark("tfns").load(DataSource(root=tmp_path))


def test_hub_offline_says_what_to_pass() -> None:
    with pytest.raises(UserError, match="--data-dir"):
        get_benchmark("tfns").load(DataSource(hub=True))


def test_suites_have_leaderboard_columns() -> None:
    assert [b.title for b in SUITES["general"]] == ["STEM", "Social Sciences", "Humanities"]
    assert [b.name for b in SUITES["finance"]] == ["fpb", "fiqa", "tfns"]
    assert [b.name for b in SUITES["medical"]] == ["pubmedqa", "medmcqa", "medqa", "careqa"]
    assert [b.name for b in SUITES["code"]] == ["humaneval", "mbpp", "multiple_js", "multiple_cpp"]
