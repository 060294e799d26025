"""The two kinds of evaluation item every benchmark loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AnswerType = Literal["sentiment", "mcq", "boolean"]
CodeLanguage = Literal["python", "js", "cpp"]


@dataclass(frozen=True)
class ChoiceItem:
    """A question with a closed answer set, prompted exactly as FlowerTune prompts it.

    ``gold`` and ``labels`` are canonical lower-case answers (``"a"``..``"d"``, ``"yes"``/``"no"``/
    ``"maybe"``, ``"negative"``/``"neutral"``/``"positive"``); ``answers`` holds the text a model is
    expected to write for each label (``"A"``, ``"positive"``), used by the log-likelihood protocol.
    """

    id: str
    prompt: str
    gold: str
    labels: tuple[str, ...]
    answers: tuple[str, ...]
    group: str = ""  # e.g. the MMLU subject

    def __post_init__(self) -> None:
        if self.gold not in self.labels:
            raise ValueError(f"item {self.id}: gold {self.gold!r} is not one of {self.labels}")
        if len(self.answers) != len(self.labels):
            raise ValueError(f"item {self.id}: one answer text per label is needed")


@dataclass(frozen=True)
class CodeTask:
    """A code-completion task: the model continues ``prompt``; ``tests`` is appended to run it."""

    id: str
    language: CodeLanguage
    prompt: str
    tests: str
    stop_words: tuple[str, ...] = field(default=())
    # A known-good completion (HumanEval/MBPP ship one), used to check the harness itself.
    reference: str | None = None

    def program(self, completion: str) -> str:
        """The file that runs: prompt + completion + tests, as bigcode-evaluation-harness joins it."""
        return self.prompt + completion + "\n" + self.tests
