"""Prompt templates for FlowerTune's four domains: one small, uniform piece per domain.

Every template turns a record with (instruction, input, output) into a prompt and a response, which
training tokenizes separately (silo_node/app/training.py): tokenizing "Answer: neutral" as one string
would train " neutral", a different token than the one an evaluator reads after the prompt's
trailing space (design notes). Records are mapped to these field names first (``columns`` in the
silo config).

Two prompt styles (``train.prompt-style``):

- ``alpaca`` (default): FlowerTune's training format, the Alpaca prompt, inside the model's chat
  template when ``model.use-chat-template`` is true;
- ``eval``: the prompt FlowerTune's finance evaluation asks with (``Instruction: ...\nInput: ...\n
  Answer: ``, never a chat template). FlowerTune trains in one format and evaluates in another;
  training in the evaluation's format makes a small-budget comparison measure what was learned
  rather than how well a format transfers (BENCHMARKS.md). The prompt here keeps its trailing space
  and the response is tokenized on its own, which yields exactly the tokens the evaluator sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from silotune.config import PromptStyle

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def instruction_answer_prompt(instruction: str, text: str) -> str:
    """FlowerTune's finance evaluation prompt (``format_example``), trailing space included."""
    context = f"Instruction: {instruction}\n"
    if text:
        context += f"Input: {text}\n"
    return context + "Answer: "


@dataclass(frozen=True)
class DomainTemplate:
    """How one domain's records become (prompt, response) pairs."""

    domain: str
    description: str
    required: tuple[str, ...]  # fields that must exist after column mapping
    default_instruction: str = ""  # used when a record has no instruction column

    def render(self, record: dict[str, str], style: PromptStyle = "alpaca") -> tuple[str, str]:
        instruction = str(record.get("instruction") or self.default_instruction).strip()
        inp = str(record.get("input") or "").strip()
        output = str(record.get("output") or "").strip()
        if style == "eval":
            return instruction_answer_prompt(instruction, inp), output
        if inp:
            prompt = ALPACA_WITH_INPUT.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_NO_INPUT.format(instruction=instruction)
        return prompt, output


FINGPT_INSTRUCTION = (
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
)
# FinGPT words the instruction by the text's kind; FlowerTune's evaluation asks TFNS and FiQA's
# posts about a "tweet", FPB and FiQA's headlines about "news".
FINGPT_TWEET_INSTRUCTION = FINGPT_INSTRUCTION.replace("this news", "this tweet")
MEDICAL_INSTRUCTION = "Answer this question truthfully"

TEMPLATES: dict[str, DomainTemplate] = {
    "general": DomainTemplate(
        "general", "general NLP, alpaca style (alpaca-gpt4)", ("instruction", "output")
    ),
    "finance": DomainTemplate(
        "finance",
        "financial sentiment, FinGPT style (fingpt-sentiment-train)",
        ("input", "output"),
        FINGPT_INSTRUCTION,
    ),
    "medical": DomainTemplate(
        "medical",
        "medical flashcards (medalpaca/medical_meadow_medical_flashcards)",
        ("input", "output"),
        MEDICAL_INSTRUCTION,
    ),
    "code": DomainTemplate("code", "code alpaca (lucasmccabe-lmi/CodeAlpaca-20k)", ("instruction", "output")),
}


def get_template(domain: str) -> DomainTemplate:
    try:
        return TEMPLATES[domain]
    except KeyError:
        raise ValueError(f"domain: unknown domain {domain!r}; known: {', '.join(TEMPLATES)}") from None
