"""What every benchmark module shares: the registry entry, where data comes from, FlowerTune's
prompt pieces, and readers that turn a missing or malformed file into an error naming the file."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evaluation.items import AnswerType, ChoiceItem, CodeTask
from silotune.errors import DataError, UserError

Domain = Literal["general", "finance", "medical", "code"]
Item = ChoiceItem | CodeTask


@dataclass(frozen=True)
class DataSource:
    """Local benchmark files under ``root`` (the ../shared/data layout), or the Hugging Face hub."""

    root: Path | None = None
    hub: bool = False

    def find(self, bench: str, *candidates: str) -> Path:
        """The first candidate (relative to root) that exists, else an error naming them all."""
        assert self.root is not None
        for rel in candidates:
            path = self.root / rel
            if path.is_file():
                return path
        wanted = " or ".join(str(self.root / c) for c in candidates)
        raise DataError(
            f"{bench}: benchmark file not found: {wanted}. Put the file there (layout in "
            f"docs/evaluation.md), point --data-dir / SILOTUNE_EVAL_DATA at the folder that "
            f"holds it, or pass --from-hub to fetch it from the Hugging Face hub."
        )

    def exists(self, rel: str) -> bool:
        return self.root is not None and (self.root / rel).is_file()


@dataclass(frozen=True)
class Benchmark:
    """One leaderboard column: how to load it and how its answers are read."""

    name: str  # machine name, e.g. "tfns"
    title: str  # as the leaderboard prints it, e.g. "TFNS"
    domain: Domain
    kind: Literal["choice", "code"]
    load: Callable[[DataSource], list[Any]]
    answer_type: AnswerType | None = None
    hub_id: str = ""
    files: tuple[str, ...] = ()  # local files it reads, relative to the data dir
    # How --limit N picks items; default: the first N.
    select: Callable[[list[Any], int], list[Any]] | None = None

    def take(self, items: list[Any], limit: int | None) -> list[Any]:
        if limit is None or limit >= len(items):
            return items
        return self.select(items, limit) if self.select else items[:limit]


# FlowerTune's medical/general prompt wrapper: a ChatML-like frame with roles "question" and
# "answer", applied verbatim whatever the model's own chat template is.
def chatml_question(body: str) -> str:
    return f"<|im_start|>question\n{body}<|im_end|>\n<|im_start|>answer\n"


def mcq_body(question: str, choices: list[str]) -> str:
    """FlowerTune's ``format_example``: question (with '?' added), blank line, lettered options."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return "Question: " + question + "\n\nOptions:\n" + options


def mcq_item(
    item_id: str,
    instruction: str,
    question: str,
    choices: list[str],
    gold_index: int,
    group: str = "",
) -> ChoiceItem:
    body = f"{instruction}\n{mcq_body(question, choices)}\nThe answer is:\n"
    letters = tuple(chr(65 + i) for i in range(len(choices)))
    return ChoiceItem(
        id=item_id,
        prompt=chatml_question(body),
        gold=letters[gold_index].lower(),
        labels=tuple(x.lower() for x in letters),
        answers=letters,
        group=group,
    )


def read_jsonl(path: Path, bench: str) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{bench}: {path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def read_json(path: Path, bench: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{bench}: {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def read_csv(path: Path, bench: str, required: Iterable[str]) -> list[dict[str, str]]:
    # utf-8-sig: the FiQA export starts with a byte-order mark.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = set(required) - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{bench}: {path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}"
            )
        return list(reader)


def need(row: dict[str, Any], keys: Iterable[str], bench: str, where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{bench}: {where}: missing field(s) {missing}")


def hub_rows(bench: str, repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub data set, or an error telling the user what to pass instead."""
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, config, split=split)
    except Exception as exc:  # offline, gated, renamed, script-based: all end the same way
        reason = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"{bench}: could not load {repo}"
            f"{f' ({config})' if config else ''} split {split!r} from the Hugging Face hub "
            f"({reason}). Offline? Pass --data-dir DIR with the local files (layout in "
            f"docs/evaluation.md) or set SILOTUNE_EVAL_DATA."
        ) from None
    return [dict(r) for r in ds]


def seeded_test_split(rows: list[dict[str, Any]], test_size: float) -> list[dict[str, Any]]:
    """``datasets.Dataset.train_test_split(test_size, seed=42)['test']``, as FlowerTune splits."""
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    return [dict(r) for r in ds.train_test_split(test_size, seed=42)["test"]]
