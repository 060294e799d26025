"""General NLP: MMLU accuracy in FlowerTune's three leaderboard categories.

The subject -> category mapping is FlowerTune's ``MMLU_CATEGORY`` (evaluation/general-nlp/
benchmarks.py); its fourth category, "other", is not on the leaderboard and is not run.
Prompt: "Answer the following multiple choice question." + lettered options + "The answer is:",
in FlowerTune's question/answer ChatML frame.
"""

from __future__ import annotations

from functools import partial

from evaluation.benchmarks.base import Benchmark, DataSource, hub_rows, mcq_item, read_csv
from evaluation.items import ChoiceItem
from silotune.errors import DataError

INSTRUCTION = "Answer the following multiple choice question."

MMLU_CATEGORY: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
LEADERBOARD_CATEGORIES = ("stem", "social_sciences", "humanities")


def load_mmlu_subject(source: DataSource, subject: str) -> list[ChoiceItem]:
    bench = f"mmlu/{subject}"
    if source.root is not None:
        path = source.find(bench, f"mmlu/test/{subject}_test.csv")
        rows = read_csv(path, bench, ("question", "choice0", "choice1", "choice2", "choice3", "answer"))
        parsed = [(r["question"], [r[f"choice{k}"] for k in range(4)], r["answer"]) for r in rows]
    else:
        rows = hub_rows(bench, "cais/mmlu", subject, "test")
        parsed = [(r["question"], list(r["choices"]), r["answer"]) for r in rows]
    items = []
    for i, (question, choices, answer) in enumerate(parsed):
        try:
            gold = int(answer)
            assert 0 <= gold < 4
        except (ValueError, AssertionError):
            raise DataError(f"{bench}: row {i + 1}: answer must be 0-3, got {answer!r}") from None
        items.append(mcq_item(f"{subject}-{i}", INSTRUCTION, question, choices, gold, subject))
    return items


def load_mmlu_category(source: DataSource, category: str) -> list[ChoiceItem]:
    items: list[ChoiceItem] = []
    for subject in MMLU_CATEGORY[category]:
        items += load_mmlu_subject(source, subject)
    return items


def _limit_spread(items: list[ChoiceItem], limit: int) -> list[ChoiceItem]:
    """First ``limit`` items taken round-robin across subjects, so a small --limit still samples
    the whole category instead of only its alphabetically first subject."""
    by_subject: dict[str, list[ChoiceItem]] = {}
    for it in items:
        by_subject.setdefault(it.group, []).append(it)
    out: list[ChoiceItem] = []
    depth = 0
    while len(out) < limit and any(depth < len(v) for v in by_subject.values()):
        for subject_items in by_subject.values():
            if depth < len(subject_items) and len(out) < limit:
                out.append(subject_items[depth])
        depth += 1
    return out


TITLES = {"stem": "STEM", "social_sciences": "Social Sciences", "humanities": "Humanities"}

BENCHMARKS = tuple(
    Benchmark(
        f"mmlu_{c}",
        TITLES[c],
        "general",
        "choice",
        partial(load_mmlu_category, category=c),
        "mcq",
        "cais/mmlu (FlowerTune used lukaemon/mmlu)",
        tuple(f"mmlu/test/{s}_test.csv" for s in MMLU_CATEGORY[c]),
        _limit_spread,
    )
    for c in LEADERBOARD_CATEGORIES
)
