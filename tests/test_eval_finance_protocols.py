"""Finance under both generation protocols: `generate` (bounded new text) and `flowertune`
(FlowerTune's exact one: whole sequence, split at "Answer: "), scored by hand on fixed outputs,
then `flowertune` end to end on the tiny random model."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import evaluation.generation as generation  # noqa: E402
import evaluation.runner as runner  # noqa: E402
from evaluation.benchmarks import DataSource, get_benchmark  # noqa: E402
from evaluation.extraction import flowertune_answer_segment, sentiment_label  # noqa: E402
from evaluation.items import ChoiceItem  # noqa: E402
from evaluation.runner import EvalSettings, evaluate_suite, run_choice  # noqa: E402
from silo_node.app.templates import instruction_answer_prompt  # noqa: E402
from silotune.errors import UserError  # noqa: E402

LABELS = ("negative", "neutral", "positive")
TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
RESTATED = f"\nInstruction: {TWEET}\nInput: shares fell\nAnswer: negative"

# (gold, input text, `generate` output = the bounded new text, `flowertune` continuation of the prompt)
CASES = [
    ("positive", "record profit", "positive", "positive"),
    ("positive", "shares jump", "Bullish", "Bullish"),  # no label word: neutral
    ("negative", "sales slump", "not positive", "not positive"),  # "positive" anywhere wins
    ("positive", "beats forecast", "POSITIVE", "POSITIVE"),  # case-sensitive: neutral
    ("neutral", "board meets", "", ""),  # empty: neutral
    # A model that does not stop restates the instruction; generate's 32 tokens end before the
    # "{negative/neutral/positive}", flowertune reads up to the next "Answer: " and finds "positive".
    ("negative", "guidance cut", "negative\nInstruction: What is the", "negative" + RESTATED),
    # The input itself holds "Answer: ": FlowerTune's segment is the rest of the INPUT line.
    ("negative", "Answer: positive times are over", "negative", "negative"),
]


def _items() -> list[ChoiceItem]:
    return [
        ChoiceItem(f"t-{i}", instruction_answer_prompt(TWEET, text), gold, LABELS, LABELS)
        for i, (gold, text, _, _) in enumerate(CASES)
    ]


def _whole(item: ChoiceItem, continuation: str) -> str:
    return item.prompt + continuation


@pytest.fixture()
def fixed_outputs(monkeypatch: pytest.MonkeyPatch) -> list[ChoiceItem]:
    """Replace both generators with the fixed texts of CASES (no model involved)."""
    items = _items()
    by_prompt = {it.prompt: case for it, case in zip(items, CASES, strict=True)}

    def greedy(model: Any, tok: Any, prompts: list[str], budget: int, **kw: Any) -> list[str]:
        return [by_prompt[p][2] for p in prompts]

    def whole(model: Any, tok: Any, prompts: list[str], **kw: Any) -> list[str]:
        return [p + by_prompt[p][3] for p in prompts]

    monkeypatch.setattr(runner, "greedy_generate", greedy)
    monkeypatch.setattr(runner, "flowertune_generate", whole)
    return items


def _f1(tp: int, predicted: int, actual: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (predicted + actual)


def test_flowertune_segment_rule() -> None:
    prompt = instruction_answer_prompt(TWEET, "x")
    assert flowertune_answer_segment(prompt + " positive") == " positive"
    assert flowertune_answer_segment(prompt + "negative" + RESTATED) == (
        f"negative\nInstruction: {TWEET}\nInput: shares fell\n"
    )
    assert flowertune_answer_segment("Answer:positive") == "None"  # no "Answer: " at all
    assert sentiment_label("None") == "neutral"
    assert flowertune_answer_segment(prompt) == ""  # nothing generated (EOS at once)


def test_generate_protocol_scores_by_hand(fixed_outputs: list[ChoiceItem]) -> None:
    result = run_choice(get_benchmark("tfns"), fixed_outputs, None, None, EvalSettings(protocol="generate"))
    preds = [r["prediction"] for r in result.records]
    assert preds == ["positive", "neutral", "positive", "neutral", "neutral", "negative", "negative"]
    assert result.value == pytest.approx(4 / 7)  # cases 1, 5, 6, 7
    # negative: 2 of 2 predicted right, 3 gold; neutral: 1 of 3, 1 gold; positive: 1 of 2, 3 gold.
    expected_f1 = (_f1(2, 2, 3) + _f1(1, 3, 1) + _f1(1, 2, 3)) / 3
    assert result.extra["macro_f1"] == pytest.approx(expected_f1)
    assert result.extra["prediction_shares"] == pytest.approx(
        {"negative": 2 / 7, "neutral": 3 / 7, "positive": 2 / 7}
    )
    assert result.extra["constant_baselines"] == pytest.approx(
        {"negative": 3 / 7, "neutral": 1 / 7, "positive": 3 / 7}
    )
    assert result.records[5]["output"] == "negative\nInstruction: What is the"


def test_flowertune_protocol_scores_by_hand(fixed_outputs: list[ChoiceItem]) -> None:
    result = run_choice(get_benchmark("tfns"), fixed_outputs, None, None, EvalSettings(protocol="flowertune"))
    preds = [r["prediction"] for r in result.records]
    assert preds == ["positive", "neutral", "positive", "neutral", "neutral", "positive", "positive"]
    assert result.value == pytest.approx(2 / 7)  # cases 1 and 5 only
    # negative: never predicted, 3 gold; neutral: 1 of 3, 1 gold; positive: 1 of 4, 3 gold.
    expected_f1 = (0.0 + _f1(1, 3, 1) + _f1(1, 4, 3)) / 3
    assert result.extra["macro_f1"] == pytest.approx(expected_f1)
    assert result.extra["prediction_shares"] == pytest.approx(
        {"negative": 0.0, "neutral": 3 / 7, "positive": 4 / 7}
    )
    # The item set is the same, so the floor is too.
    assert result.extra["constant_baselines"] == pytest.approx(
        {"negative": 3 / 7, "neutral": 1 / 7, "positive": 3 / 7}
    )
    assert result.extra["label_recall"] == pytest.approx({"negative": 0.0, "neutral": 1.0, "positive": 1 / 3})
    # Records keep FlowerTune's out_text: the segment, not the whole sequence.
    assert "{negative/neutral/positive}" in result.records[5]["output"]
    assert result.records[6]["output"] == "positive times are over\n"


def test_pad_rule() -> None:
    tok = SimpleNamespace
    assert generation.needs_flowertune_pad(tok(pad_token=None, pad_token_id=None, eos_token_id=2))
    assert generation.needs_flowertune_pad(tok(pad_token="</s>", pad_token_id=2, eos_token_id=2))
    assert not generation.needs_flowertune_pad(tok(pad_token="<pad>", pad_token_id=0, eos_token_id=2))


def test_runner_refuses_what_is_not_flowertune(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    settings = EvalSettings(protocol="flowertune")
    source = DataSource(root=tmp_path)
    with pytest.raises(UserError, match="finance"):
        evaluate_suite("medical", None, tok, source, settings, base_model="m", adapter=None)
    tok.pad_token = tok.eos_token  # silotune's old load_tokenizer choice: not FlowerTune's
    with pytest.raises(UserError, match=r"\[PAD\]"):
        evaluate_suite("finance", None, tok, source, settings, base_model="m", adapter=None)


# --- the tiny random model, end to end ------------------------------------------------------------
def _tfns_dir(tmp_path: Path, texts: list[str]) -> Path:
    root = tmp_path / "bench"
    (root / "tfns").mkdir(parents=True)
    with open(root / "tfns" / "sent_valid.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i, text in enumerate(texts):
            writer.writerow([text, i % 3])
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "cache"))


def test_flowertune_end_to_end_on_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    import importlib.util

    logs: list[str] = []
    loaded = generation.load_flowertune_model(str(tiny_model), log=logs.append)
    if importlib.util.find_spec("bitsandbytes"):
        assert loaded.quantization == "4bit", loaded.quantization_note
    assert not loaded.added_pad  # the tiny tokenizer's pad is not its EOS
    assert loaded.tokenizer.padding_side == "right"  # the tokenizer's default, kept
    texts = ["the market rose", "shares fell after weak guidance on Friday", "neutral"]
    settings = EvalSettings(
        protocol="flowertune",
        batch_size=3,
        benchmarks=("tfns",),
        quantization=loaded.quantization,
        quantization_note=loaded.quantization_note,
        log=logs.append,
    )
    source = DataSource(root=_tfns_dir(tmp_path, texts))
    report = evaluate_suite(
        "finance", loaded.model, loaded.tokenizer, source, settings, base_model=str(tiny_model), adapter=None
    )
    (result,) = report.results
    assert report.settings["max_length"] == 512 and report.settings["padding_side"] == "right"
    assert report.settings["quantization"] == loaded.quantization
    prompts = [instruction_answer_prompt(TWEET, t) for t in texts]
    whole = generation.flowertune_generate(loaded.model, loaded.tokenizer, prompts, batch_size=3)
    for prompt, text, record in zip(prompts, whole, result.records, strict=True):
        assert text.startswith(prompt)  # the prompt decodes intact; right-side [PAD]s are dropped
        assert record["output"] == flowertune_answer_segment(text)
        assert record["prediction"] == sentiment_label(record["output"])
    assert result.value == pytest.approx(sum(r["correct"] for r in result.records) / 3)
    assert report.constant_baselines_average == result.extra["constant_baselines"]


def _variant_with_pad_as_eos(tiny_model: Path, tmp_path: Path) -> Path:
    from transformers import AutoTokenizer

    variant = tmp_path / "pad-is-eos"
    shutil.copytree(tiny_model, variant)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(variant)
    return variant


def test_pad_token_added_when_pad_is_eos(tiny_model: Path, tmp_path: Path) -> None:
    variant = _variant_with_pad_as_eos(tiny_model, tmp_path)
    loaded = generation.load_flowertune_model(str(variant), quantization="none", log=lambda m: None)
    assert loaded.added_pad and loaded.tokenizer.pad_token == "[PAD]"
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id
    assert loaded.model.get_input_embeddings().num_embeddings == len(loaded.tokenizer)
    assert loaded.quantization == "none" and "--quantization none" in loaded.quantization_note


def test_4bit_failure_falls_back_loudly(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(location: str, device: str) -> Any:
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(generation, "_load_4bit", broken)
    logs: list[str] = []
    loaded = generation.load_flowertune_model(str(tiny_model), quantization="4bit", log=logs.append)
    assert loaded.quantization == "none"
    assert "4-bit unavailable" in loaded.quantization_note and "RuntimeError" in loaded.quantization_note
    assert any("UNQUANTIZED" in m for m in logs)


def test_a_finished_batch_stops_early(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks token id 0 ...
    tok.eos_token = tok.convert_ids_to_tokens(0)  # ... which is now EOS (and the pad: [PAD] added)
    assert generation.add_flowertune_pad(model, tok)
    shapes: list[tuple[int, int]] = []
    plain = model.generate

    def spy(**kwargs: Any) -> Any:
        out = plain(**kwargs)
        shapes.append((kwargs["input_ids"].shape[1], out.shape[1]))
        return out

    model.generate = spy
    prompts = [instruction_answer_prompt(TWEET, t) for t in ("up", "down a lot today")]
    whole = generation.flowertune_generate(model, tok, prompts, batch_size=2)
    ((width, total),) = shapes
    assert total == width + 1  # one step, every row at EOS: no run to 512
    assert [flowertune_answer_segment(t) for t in whole] == ["", ""]
