"""Write a suite's results: JSON (everything), JSONL per benchmark (every item), and a markdown
table shaped like the FlowerTune leaderboard (benchmarks, then the domain average)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evaluation.runner import PROTOCOL_LABELS, SuiteReport
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
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


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
