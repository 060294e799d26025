"""Medical: PubMedQA, MedMCQA, MedQA and CareQA accuracy, with FlowerTune's Meditron-style
instructions, lettered options and question/answer ChatML frame."""

from __future__ import annotations

from typing import Any

from evaluation.benchmarks.base import (
    Benchmark,
    DataSource,
    chatml_question,
    hub_rows,
    mcq_item,
    need,
    read_json,
    read_jsonl,
)
from evaluation.items import ChoiceItem
from silotune.errors import DataError

# Verbatim from FlowerTune (which took them from Meditron); MedQA's says "A to E" although the
# 4-option variant is used.
_MCQ_SCHOOL = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying "
    "health, disease, patient care, and modes of therapy, answer the following multiple-choice "
    "question. Select one correct answer from A to D. Base your answer on the current and "
    "standard practices referenced in medical guidelines."
)
INSTRUCTIONS = {
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge, can you tell me "
    "if the following statement is correct? Answer yes, no, or maybe.",
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. You need to "
    "demonstrate your understanding of basic and clinical science, medical knowledge, and "
    "mechanisms underlying health, disease, patient care, and modes of therapy. Show your ability "
    "to apply the knowledge essential for medical practice. For the following multiple-choice "
    "question, select one correct answer from A to E. Base your answer on the current and "
    "standard practices referenced in medical guidelines.",
    "medmcqa": _MCQ_SCHOOL,
    "careqa": _MCQ_SCHOOL,
}
LETTERS = "ABCD"

PUBMEDQA_FILES = ("pubmedqa/ori_pqal.json", "pubmedqa/test_ground_truth.json")
MEDMCQA_FILE = "medmcqa/medmcqa_test.json"
MEDQA_FILE = "medqa/test.jsonl"
CAREQA_FILE = "careqa/careqa_test.json"


def load_pubmedqa(source: DataSource) -> list[ChoiceItem]:
    """PQA-L test fold (500): contexts joined by newlines, then the question; gold yes/no/maybe."""
    if source.root is not None:
        pqal = read_json(source.find("pubmedqa", PUBMEDQA_FILES[0]), "pubmedqa")
        truth = read_json(source.find("pubmedqa", PUBMEDQA_FILES[1]), "pubmedqa")
        rows = []
        for pmid, label in truth.items():
            if pmid not in pqal:
                raise DataError(f"pubmedqa: test id {pmid} is not in {PUBMEDQA_FILES[0]}")
            rows.append({"id": pmid, **pqal[pmid], "final_decision": label})
    else:
        rows = hub_rows("pubmedqa", "bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test")
    items = []
    for i, row in enumerate(rows):
        need(row, ("QUESTION", "CONTEXTS", "final_decision"), "pubmedqa", f"item {i + 1}")
        context = "\n".join(row["CONTEXTS"])
        body = f"{INSTRUCTIONS['pubmedqa']}\n{context}\n{row['QUESTION']}\nThe answer is:\n"
        gold = str(row["final_decision"]).lower()
        items.append(
            ChoiceItem(
                f"pubmedqa-{row.get('id', row.get('PUBMED_ID', i))}",
                chatml_question(body),
                gold,
                ("yes", "no", "maybe"),
                ("yes", "no", "maybe"),
            )
        )
    return items


def _letter_items(name: str, rows: list[dict[str, Any]]) -> list[ChoiceItem]:
    """Rows with ``question``, ``options`` {A..D: text} and ``gold`` letter."""
    items = []
    for i, row in enumerate(rows):
        need(row, ("question", "options", "gold"), name, f"item {i + 1}")
        options = row["options"]
        if sorted(options) != list(LETTERS) or row["gold"] not in LETTERS:
            raise DataError(
                f"{name}: item {i + 1}: need options A-D and a gold letter A-D, got "
                f"options {sorted(options)} and gold {row['gold']!r}"
            )
        items.append(
            mcq_item(
                f"{name}-{row.get('id', i)}",
                INSTRUCTIONS[name],
                row["question"],
                [options[k] for k in LETTERS],
                LETTERS.index(row["gold"]),
            )
        )
    return items


def load_medmcqa(source: DataSource) -> list[ChoiceItem]:
    """MedMCQA validation split (4,183), FlowerTune's evaluation split."""
    if source.root is not None:
        data = read_json(source.find("medmcqa", MEDMCQA_FILE), "medmcqa")
        rows = [
            {
                "id": v.get("id", k),
                "question": v.get("question"),
                "options": v.get("options"),
                "gold": v.get("correct_answer"),
            }
            for k, v in data.items()
        ]
    else:
        raw = hub_rows("medmcqa", "openlifescienceai/medmcqa", None, "validation")
        rows = [
            {
                "id": r["id"],
                "question": r["question"],
                "options": dict(zip(LETTERS, (r["opa"], r["opb"], r["opc"], r["opd"]), strict=True)),
                "gold": LETTERS[int(r["cop"])],
            }
            for r in raw
        ]
    return _letter_items("medmcqa", rows)


def load_medqa(source: DataSource) -> list[ChoiceItem]:
    """MedQA-USMLE 4-option test (1,273)."""
    if source.root is not None:
        raw = read_jsonl(source.find("medqa", MEDQA_FILE), "medqa")
    else:
        raw = hub_rows("medqa", "GBaker/MedQA-USMLE-4-options", None, "test")
    rows = []
    for i, r in enumerate(raw):
        need(r, ("question", "options", "answer_idx"), "medqa", f"item {i + 1}")
        rows.append(
            {
                "id": r.get("realidx", i),
                "question": r["question"],
                "options": r["options"],
                "gold": r["answer_idx"],
            }
        )
    return _letter_items("medqa", rows)


def load_careqa(source: DataSource) -> list[ChoiceItem]:
    """CareQA English closed-ended test (5,621)."""
    if source.root is not None:
        data = read_json(source.find("careqa", CAREQA_FILE), "careqa")
        rows = [
            {
                "id": k,
                "question": v.get("question"),
                "options": v.get("options"),
                "gold": v.get("correct_answer"),
            }
            for k, v in data.items()
        ]
    else:
        raw = hub_rows("careqa", "HPAI-BSC/CareQA", "CareQA_en", "test")
        rows = [
            {
                "id": i,
                "question": r["question"],
                "options": dict(zip(LETTERS, (r["op1"], r["op2"], r["op3"], r["op4"]), strict=True)),
                "gold": LETTERS[int(r["cop"]) - 1],
            }
            for i, r in enumerate(raw)
        ]
    return _letter_items("careqa", rows)


BENCHMARKS = (
    Benchmark(
        "pubmedqa",
        "PubMedQA",
        "medical",
        "choice",
        load_pubmedqa,
        "boolean",
        "bigbio/pubmed_qa (pubmed_qa_labeled_fold0_source)",
        PUBMEDQA_FILES,
    ),
    Benchmark(
        "medmcqa",
        "MedMCQA",
        "medical",
        "choice",
        load_medmcqa,
        "mcq",
        "openlifescienceai/medmcqa",
        (MEDMCQA_FILE,),
    ),
    Benchmark(
        "medqa",
        "MedQA",
        "medical",
        "choice",
        load_medqa,
        "mcq",
        "GBaker/MedQA-USMLE-4-options",
        (MEDQA_FILE,),
    ),
    Benchmark(
        "careqa",
        "CareQA",
        "medical",
        "choice",
        load_careqa,
        "mcq",
        "HPAI-BSC/CareQA (CareQA_en)",
        (CAREQA_FILE,),
    ),
)
