"""Answer extraction, rule for rule as FlowerTune's evaluation scripts do it.

Finance (``change_target`` in evaluation/finance/utils.py): any mention of "positive" wins, then
"negative", and everything else (including empty output) counts as "neutral".

Finance under ``--protocol flowertune`` (``inference`` in evaluation/finance/benchmarks.py): the WHOLE
sequence, prompt included, is decoded and the answer is the text between the first and second
"Answer: " (the prompt's own ends the first), or "None" when there is no "Answer: " at all. A model
that does not stop and restates the instruction ("...from {negative/neutral/positive}") therefore
answers "positive" whatever it said first.

Multiple choice and yes/no (``format_answer`` in evaluation/{medical,general-nlp}/utils.py): the
output is lower-cased, non-alphanumerics become spaces, and for multiple choice the FIRST character
is the answer ("B) aspirin" -> "b"; "The answer is B" -> "t", i.e. wrong). An output that does not
reduce to one of a-e/yes/no is compared verbatim (lower-cased) with the gold answer, which is how
"maybe" can still match - but only when the model wrote exactly "maybe".

Code (bigcode-evaluation-harness ``_stop_at_stop_token``): cut the completion at the first stop word.
"""

from __future__ import annotations

import re

from evaluation.items import AnswerType

_RECOGNISED = {"a", "b", "c", "d", "e", "yes", "no"}


def sentiment_label(text: str) -> str:
    """FlowerTune finance: map free text to negative/neutral/positive."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


FLOWERTUNE_ANSWER_MARK = "Answer: "


def flowertune_answer_segment(decoded: str) -> str:
    """FlowerTune finance: ``o.split("Answer: ")[1]`` of the whole decoded sequence, else "None"."""
    parts = decoded.split(FLOWERTUNE_ANSWER_MARK)
    return parts[1] if len(parts) > 1 else "None"


def _ascii(text: str) -> str:
    return text.encode("ascii", "ignore").decode("ascii")


def _clean_boolean(text: str) -> str:
    # FlowerTune's replacements of doubled answers; only the first matching pattern applies.
    for pattern, repl in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
        if pattern in text:
            text = text.replace(pattern, repl)
            break
    return _ascii(text)


def choice_label(output: str, answer_type: AnswerType) -> str:
    """FlowerTune's ``format_answer`` prediction for one output (lower case)."""
    if answer_type == "sentiment":
        return sentiment_label(output)
    full = output.lower()
    text = full
    if "\n##" in text:
        parts = text.split("\n##")
        text = parts[1].split("\n")[0].strip().lower()
    text = re.sub(r"[^a-zA-Z0-9]", " ", text).strip()
    text = re.sub(" +", " ", text)
    if answer_type == "boolean":
        text = _clean_boolean(text)
    else:
        text = _ascii(text)[:1]
    return text if text in _RECOGNISED else full


def stop_at_stop_words(completion: str, stop_words: tuple[str, ...] | list[str]) -> str:
    """Cut ``completion`` at the earliest stop word (bigcode-evaluation-harness semantics)."""
    cut = len(completion)
    for word in stop_words:
        idx = completion.find(word)
        if idx != -1:
            cut = min(cut, idx)
    return completion[:cut]
