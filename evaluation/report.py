"""Write a suite's results: JSON (everything), JSONL per benchmark (every item), and a markdown
table shaped like the FlowerTune leaderboard (benchmarks, then the domain average), followed, for
finance, by what the label prior alone would score on the same items."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evaluation.runner import PROTOCOL_LABELS, SuiteReport
from evaluation.scoring import BenchmarkResult
from silotune.atomic_files import atomic_write_json, atomic_write_text

SCHEMA = "silotune.eval/v1"


def to_json(report: SuiteReport) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "suite": report.suite,
        "base_model": report.base_model,
        "base_identity": report.base_identity,
        "adapter": report.adapter,
        "protocol": report.protocol,
        "protocol_description": PROTOCOL_LABELS[report.protocol],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 1),
        "settings": report.settings,
        "benchmarks": [r.summary() for r in report.results],
        "average": report.average,
        **_baseline_json(report),
    }


def _baseline_json(report: SuiteReport) -> dict[str, Any]:
    averages = report.constant_baselines_average
    return {"constant_baselines_average": averages} if averages else {}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _weights_line(settings: dict[str, Any]) -> list[str]:
    if not settings.get("quantization"):
        return []  # reports written by callers that do not record it (compare)
    note = settings.get("quantization_note")
    return [f"- weights: {settings['quantization']}" + (f" ({note})" if note else "")]


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _prior_columns(results: list[BenchmarkResult]) -> list[str]:
    labels: list[str] = []
    for r in results:
        labels += [k for k in r.extra["constant_baselines"] if k not in labels]
    return labels


def _prior_row(r: BenchmarkResult, labels: list[str]) -> str:
    shares = r.extra.get("prediction_shares", {})
    cells = [r.title, str(r.n), _pct(r.value), _pct(r.extra.get("macro_f1", 0.0))]
    cells += [_pct(shares.get(x, 0.0)) for x in labels]
    return _md_row(cells + [_pct(r.extra["constant_baselines"].get(x, 0.0)) for x in labels])


def prior_table(report: SuiteReport) -> list[str]:
    """Accuracy beside macro-F1, the share of each predicted label and the constant baselines.

    A finance accuracy means little alone: always-"neutral" scores 44.54 on the full suite and a
    collapsed model's accuracy is its collapsed label's gold share.
    """
    rows = [r for r in report.results if "constant_baselines" in r.extra]
    if not rows:
        return []
    labels = _prior_columns(rows)
    head = ["Benchmark", "n", "Accuracy", "Macro-F1"]
    head += [f"Predicted {x}" for x in labels] + [f"Always {x}" for x in labels]
    lines = ["### Against the label prior (%)", "", _md_row(head), "|" + "---|" * len(head)]
    lines += [_prior_row(r, labels) for r in rows]
    averages = report.constant_baselines_average
    mean_acc = sum(r.value for r in rows) / len(rows)
    mean_f1 = sum(r.extra.get("macro_f1", 0.0) for r in rows) / len(rows)
    cells = ["Average", "", _pct(mean_acc), _pct(mean_f1)] + [""] * len(labels)
    return [*lines, _md_row(cells + [_pct(averages.get(x, 0.0)) for x in labels]), ""]


def to_markdown(report: SuiteReport) -> str:
    metric = report.results[0].metric if report.results else "accuracy"
    titles = [r.title for r in report.results]
    lines = [
        f"## {report.suite} ({metric}, %)",
        "",
        f"- base model: `{report.base_model}`"
        + (f" (weights `{report.base_identity}`)" if report.base_identity else ""),
        f"- adapter: `{report.adapter or 'none'}`",
        f"- protocol: {PROTOCOL_LABELS[report.protocol]}",
        *_weights_line(report.settings),
        "- items: "
        + ", ".join(f"{r.title} {r.n}" for r in report.results)
        + (f" (--limit {report.settings['limit']})" if report.settings.get("limit") else ""),
        "",
        "| Base model | Adapter | Protocol | " + " | ".join(titles) + " | Average |",
        "|" + "---|" * (len(titles) + 4),
        f"| {report.base_model} | {report.adapter or 'none'} | {report.protocol} | "
        + " | ".join(_pct(r.value) for r in report.results)
        + f" | {_pct(report.average)} |",
        "",
        *prior_table(report),
    ]
    return "\n".join(lines)


def write_report(report: SuiteReport, out_dir: Path) -> dict[str, Path]:
    """Write ``<suite>-<protocol>.json`` / ``.md`` and per-item JSONL; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report.suite}-{report.protocol}"
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    atomic_write_json(paths["json"], to_json(report), sort_keys=False)
    atomic_write_text(paths["markdown"], to_markdown(report))
    items_dir = out_dir / f"{stem}-items"
    items_dir.mkdir(exist_ok=True)
    for r in report.results:
        with open(items_dir / f"{r.name}.jsonl", "w", encoding="utf-8") as f:
            for rec in r.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    paths["items"] = items_dir
    return paths
