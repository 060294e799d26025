"""Run one suite: load each benchmark, generate (or score), extract, and score."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evaluation.benchmarks import SUITES, Benchmark, DataSource
from evaluation.extraction import choice_label, flowertune_answer_segment, stop_at_stop_words
from evaluation.generation import (
    FLOWERTUNE_MAX_LENGTH,
    FLOWERTUNE_SEED,
    flowertune_generate,
    greedy_generate,
    loglik_choose,
    needs_flowertune_pad,
    sampling_settings,
)
from evaluation.items import ChoiceItem, CodeTask
from evaluation.sandbox import SandboxLimits, isolation_mode, run_program
from evaluation.scoring import (
    BenchmarkResult,
    accuracy,
    average_constant_baselines,
    constant_baselines,
    domain_average,
    label_recall,
    macro_f1,
    majority_accuracy,
    mean_pass_at_1,
    prediction_shares,
)
from silotune.errors import UserError

Protocol = Literal["generate", "loglik", "flowertune"]
PROTOCOL_LABELS = {
    "generate": "generate (FlowerTune prompts and answer extraction, greedy, left padding, bounded "
    "answer length; finance differs from the leaderboard's protocol: see --protocol flowertune)",
    "loglik": "loglik (NOT FlowerTune: highest log-likelihood answer among the options)",
    "flowertune": "flowertune (FlowerTune's exact finance protocol: 4-bit weights unless the quantization "
    "setting says otherwise, [PAD], the tokenizer's padding side, 512 tokens in total, answer = whole "
    "sequence split at 'Answer: ')",
}


@dataclass
class EvalSettings:
    protocol: Protocol = "generate"
    limit: int | None = None
    batch_size: int = 8
    # Finance answers are free text; FlowerTune lets them run to 512 tokens in total, which on
    # a CPU costs minutes per batch. 32 new tokens cover "positive"/"The sentiment is ...".
    finance_max_new_tokens: int = 32
    code_max_new_tokens: int = 512
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    benchmarks: tuple[str, ...] | None = None  # a subset of the suite, by name
    # What the caller loaded (recorded, not applied): "4bit" or "none", and how/why.
    quantization: str = "none"
    quantization_note: str = ""
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))


@dataclass
class SuiteReport:
    suite: str
    protocol: Protocol
    base_model: str
    adapter: str | None
    results: list[BenchmarkResult]
    settings: dict[str, Any]
    seconds: float = 0.0
    base_identity: str = ""  # name@sha256 prefix of the weights, when the loader provides it

    @property
    def average(self) -> float:
        return domain_average(self.results)

    @property
    def constant_baselines_average(self) -> dict[str, float]:
        """Per label, the domain average of always giving it (finance: neutral 44.54 in full)."""
        return average_constant_baselines(self.results)


def _progress(log: Callable[[str], None], name: str) -> Callable[[int, int], None]:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 10:
            last[0] = now
            log(f"  {name}: {done}/{total}")

    return report


def _answer_tokens(tokenizer: Any, item: ChoiceItem) -> int:
    """FlowerTune generates as many tokens as the gold answer has; using the longest option
    instead gives every item the same budget without looking at its label."""
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in item.answers)


def _generate_answers(
    bench: Benchmark, items: list[ChoiceItem], model: Any, tokenizer: Any, s: EvalSettings
) -> list[str]:
    """The text each item's prediction is read from, per the protocol."""
    progress = _progress(s.log, bench.name)
    prompts = [i.prompt for i in items]
    if s.protocol == "flowertune":
        whole = flowertune_generate(model, tokenizer, prompts, batch_size=s.batch_size, progress=progress)
        return [flowertune_answer_segment(text) for text in whole]
    if bench.answer_type == "sentiment":
        budget = s.finance_max_new_tokens
    else:
        budget = max(_answer_tokens(tokenizer, it) for it in items) if items else 1
    return greedy_generate(model, tokenizer, prompts, budget, batch_size=s.batch_size, progress=progress)


def _predict(
    bench: Benchmark, items: list[ChoiceItem], model: Any, tokenizer: Any, s: EvalSettings
) -> tuple[list[str], list[str]]:
    """(outputs, predictions) for every item."""
    assert bench.answer_type is not None
    if s.protocol == "loglik":
        picks = loglik_choose(
            model,
            tokenizer,
            [i.prompt for i in items],
            [i.answers for i in items],
            batch_size=s.batch_size,
            progress=_progress(s.log, bench.name),
        )
        outputs = [it.answers[k] for it, k in zip(items, picks, strict=True)]
        return outputs, [it.labels[k] for it, k in zip(items, picks, strict=True)]
    outputs = _generate_answers(bench, items, model, tokenizer, s)
    # Finance: change_target, also on flowertune's segment ("None" -> neutral).
    return outputs, [choice_label(o, bench.answer_type) for o in outputs]


def choice_extra(
    answer_type: str | None, labels: tuple[str, ...], preds: list[str], golds: list[str]
) -> dict[str, Any]:
    """What is reported beside a closed-answer accuracy; finance adds what the label prior explains."""
    extra: dict[str, Any] = {
        "macro_f1": macro_f1(preds, golds),
        "label_recall": label_recall(preds, golds),
        "majority_accuracy": majority_accuracy(golds),
    }
    if answer_type == "sentiment":
        extra["prediction_shares"] = prediction_shares(preds, labels)
        extra["constant_baselines"] = constant_baselines(golds, labels)
    return extra


def run_choice(
    bench: Benchmark, items: list[ChoiceItem], model: Any, tokenizer: Any, s: EvalSettings
) -> BenchmarkResult:
    outputs, preds = _predict(bench, items, model, tokenizer, s)
    golds = [i.gold for i in items]
    records = [
        {
            "id": it.id,
            "gold": it.gold,
            "output": out,
            "prediction": pred,
            "correct": pred == it.gold,
            **({"group": it.group} if it.group else {}),
        }
        for it, out, pred in zip(items, outputs, preds, strict=True)
    ]
    labels = items[0].labels if items else ()
    extra = choice_extra(bench.answer_type, labels, preds, golds)
    return BenchmarkResult(
        bench.name, bench.title, "accuracy", accuracy(preds, golds), len(items), records, extra
    )


def run_code(
    bench: Benchmark, tasks: list[CodeTask], model: Any, tokenizer: Any, s: EvalSettings
) -> BenchmarkResult:
    progress = _progress(s.log, bench.name)
    records: list[dict[str, Any]] = []
    passed: list[list[bool]] = []
    # All tasks of one benchmark share their stop words (MultiPL-E repeats its language's set on
    # every row), so one stopping rule serves every batch.
    outputs = greedy_generate(
        model,
        tokenizer,
        [t.prompt for t in tasks],
        s.code_max_new_tokens,
        stop_words=tasks[0].stop_words if tasks else (),
        batch_size=s.batch_size,
        progress=progress,
    )
    for task, out in zip(tasks, outputs, strict=True):
        completion = stop_at_stop_words(out, task.stop_words)
        result = run_program(task.language, task.program(completion), s.sandbox)
        passed.append([result.passed])
        records.append(
            {
                "id": task.id,
                "completion": completion,
                "status": result.status,
                "passed": result.passed,
                "stderr": result.stderr[-1000:],
            }
        )
    return BenchmarkResult(
        bench.name,
        bench.title,
        "pass@1",
        mean_pass_at_1(passed),
        len(tasks),
        records,
        {"sandbox_isolation": isolation_mode()},
    )


def _check_protocol(suite: str, settings: EvalSettings, tokenizer: Any) -> None:
    if settings.protocol == "loglik" and suite == "code":
        raise UserError(
            "--protocol loglik scores multiple-choice answers; the code suite is "
            "always run with --protocol generate"
        )
    if settings.protocol == "flowertune":
        if suite != "finance":
            raise UserError(
                "--protocol flowertune is FlowerTune's finance protocol; other suites run with "
                "--protocol generate or loglik"
            )
        if needs_flowertune_pad(tokenizer):
            # Silently batching with pad = EOS would not be FlowerTune's protocol.
            raise UserError(
                "--protocol flowertune needs FlowerTune's tokenizer set-up (a pad distinct from EOS, "
                "'[PAD]' added): load with evaluation.generation.load_flowertune_model"
            )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has neither a pad nor an eos token; cannot batch")


def _recorded_settings(settings: EvalSettings, model: Any, tokenizer: Any) -> dict[str, Any]:
    recorded: dict[str, Any] = {
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "finance_max_new_tokens": settings.finance_max_new_tokens,
        "code_max_new_tokens": settings.code_max_new_tokens,
        "protocol_description": PROTOCOL_LABELS[settings.protocol],
        "quantization": settings.quantization,
        "quantization_note": settings.quantization_note,
    }
    if settings.protocol == "flowertune":
        del recorded["finance_max_new_tokens"]  # not used: the total length is fixed
        recorded["max_length"] = FLOWERTUNE_MAX_LENGTH
        recorded["seed"] = FLOWERTUNE_SEED
        recorded["padding_side"] = getattr(tokenizer, "padding_side", None)
        recorded["pad_token"] = tokenizer.pad_token
        recorded["sampling"] = sampling_settings(model)
    return recorded


def evaluate_suite(
    suite: str,
    model: Any,
    tokenizer: Any,
    source: DataSource,
    settings: EvalSettings,
    *,
    base_model: str,
    adapter: str | None,
    base_identity: str = "",
) -> SuiteReport:
    if suite not in SUITES:
        raise UserError(f"--suite {suite}: choose one of {', '.join(SUITES)}")
    benches = SUITES[suite]
    if settings.benchmarks:
        unknown = set(settings.benchmarks) - {b.name for b in benches}
        if unknown:
            raise UserError(
                f"--benchmarks: {sorted(unknown)} not in suite {suite} ({', '.join(b.name for b in benches)})"
            )
        benches = tuple(b for b in benches if b.name in settings.benchmarks)
    _check_protocol(suite, settings, tokenizer)
    if settings.protocol == "flowertune":
        if sampling_settings(model):  # FlowerTune does not override it either
            settings.log(f"flowertune: the model's generation_config samples: {sampling_settings(model)}")
        torch.manual_seed(FLOWERTUNE_SEED)
    start = time.monotonic()
    results = []
    for bench in benches:
        items = bench.take(bench.load(source), settings.limit)
        settings.log(f"{suite}/{bench.name}: {len(items)} items")
        if bench.kind == "code":
            results.append(run_code(bench, items, model, tokenizer, settings))
        else:
            results.append(run_choice(bench, items, model, tokenizer, settings))
        r = results[-1]
        settings.log(f"{suite}/{bench.name}: {r.metric} {100 * r.value:.2f} (n={r.n})")
    return SuiteReport(
        suite=suite,
        protocol=settings.protocol,
        base_model=base_model,
        adapter=adapter,
        results=results,
        seconds=time.monotonic() - start,
        base_identity=base_identity,
        settings=_recorded_settings(settings, model, tokenizer),
    )
