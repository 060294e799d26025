"""`silotune report RUN_DIR`: one self-contained HTML file with the run's curves, for people
without Grafana. Charts are inline SVG drawn here (no matplotlib, no JS, no external CSS), so the
file opens anywhere, offline, and can be mailed as is. Like the exporter it shows numbers and
silo names only, never data content.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from silotune import protocol
from silotune.atomic_files import atomic_write_text
from silotune.errors import UserError
from silotune.events import finite_number, read_events

Series = dict[str, list[tuple[float, float]]]  # legend -> [(round, value)]
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_W, _H, _L, _R, _T, _B = 580, 300, 70, 170, 34, 40  # size and margins (legend on the right)


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        for scale, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if unit == "share":
        return f"{100 * value:.3g}%"
    return f"{value:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(k for k in (1, 2, 2.5, 5, 10) if raw <= step * k)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2)]


def line_chart(title: str, series: Series, unit: str = "", empty: str = "", note: str = "") -> str:
    """An SVG line chart of value per round, ``note`` under the title; ``empty`` (why there is no
    data) when there is nothing to draw. ``unit``: "bytes", "share" (0..1, drawn on 0..100 %) or ""."""
    points = [p for pts in series.values() for p in pts]
    esc = html.escape
    if not points:
        why = empty or "no data in these events."
        extra = f"<br>{esc(note)}" if note else ""
        return f'<div class="empty"><b>{esc(title)}</b>: {esc(why)}{extra}</div>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs)
    if unit == "share" and not all(0.0 <= y <= 1.0 for y in ys):
        unit = ""  # not fractions after all (a percentage, say): plot the numbers as they are
    if unit == "share":
        yt = [i / 5 for i in range(6)]
    else:
        yt = _ticks(min(0.0, min(ys)) if unit == "bytes" else min(ys), max(ys))
    ylo, yhi = yt[0], yt[-1]
    top = _T + (14 if note else 0)
    pw, ph = _W - _L - _R, _H - top - _B

    def sx(x: float) -> float:
        return _L + (0.5 if xhi == xlo else (x - xlo) / (xhi - xlo)) * pw

    def sy(y: float) -> float:
        return top + ph - (y - ylo) / (yhi - ylo) * ph

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
        f'<text x="{_L}" y="20" class="t">{esc(title)}</text>',
        *([f'<text x="{_L}" y="{_T + 4}" class="n">{esc(note)}</text>'] if note else []),
        f'<rect x="{_L}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    for y in yt:
        out.append(f'<line x1="{_L}" x2="{_L + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="g"/>')
        out.append(f'<text x="{_L - 6}" y="{sy(y) + 4:.1f}" class="yl">{_fmt(y, unit)}</text>')
    for x in sorted(set(xs)) if len(set(xs)) <= 12 else _ticks(xlo, xhi):
        if xlo <= x <= xhi:
            out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" class="xl">{x:g}</text>')
    out.append(f'<text x="{_L + pw / 2}" y="{_H - 6}" class="xl">round</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = sorted(pts)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        # Every other series dashed: equal series (uplink = downlink) stay visible on top.
        dash = ' stroke-dasharray="7 4"' if i % 2 else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y in pts:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                f"<title>{esc(name)} round {x:g}: {_fmt(y, unit)}</title></circle>"
            )
        ly = top + 14 + 18 * i
        out.append(f'<rect x="{_L + pw + 10}" y="{ly - 9}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text x="{_L + pw + 26}" y="{ly}" class="lg">{esc(name[:26])}</text>')
    out.append("</svg>")
    return "".join(out)


class RunData:
    """The events of one run directory, grouped per round and per silo."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.run: dict[str, Any] = {}
        self.end: dict[str, Any] = {}
        self.rounds: dict[float, dict[str, Any]] = {}
        self.silo: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
        self.evaluation: dict[float, dict[str, float]] = {}
        self.evaluated: dict[float, str] = {}  # round -> what was evaluated, where an event says
        self.failures: dict[str, int] = defaultdict(int)
        self.rejected: dict[str, int] = defaultdict(int)
        # Failure events may carry only a node id: name it after that node's results.
        names = {str(e["node_id"]): e["silo"] for e in events if e.get("silo") and "node_id" in e}

        def who(e: dict[str, Any]) -> str:
            return str(e.get("silo") or names.get(str(e.get("node_id")), e.get("node_id")))

        for e in events:
            kind, rnd = e.get("kind"), e.get("round")
            if kind == protocol.EV_RUN_START:
                self.run = e
            elif kind == protocol.EV_RUN_END:
                self.end = e
            elif kind == protocol.EV_ROUND_END and _is_num(rnd):
                self.rounds[rnd] = e
            elif kind in (protocol.EV_SILO_RESULT, protocol.EV_LOCAL_TRAIN) and _is_num(rnd):
                # The server's view wins; a silo's own file fills what the server lacks.
                row = self.silo[who(e)].setdefault(rnd, {})
                for k, v in e.items():
                    if kind == protocol.EV_SILO_RESULT or k not in row:
                        row[k] = v
            elif kind == protocol.EV_EVALUATION and isinstance(e.get("metrics"), dict):
                # Several evaluations of one round (the silos' loss, a held-out accuracy) add up.
                self.evaluation.setdefault(rnd, {}).update(
                    {k: v for k, v in e["metrics"].items() if _is_num(v)}
                )
                if isinstance(e.get("model"), str):
                    self.evaluated[rnd] = e["model"]
            elif kind == protocol.EV_SILO_FAILED:
                self.failures[who(e)] += 1
            elif kind == protocol.EV_UPDATE_REJECTED:
                self.rejected[who(e)] += 1

    def per_round(self, key: str) -> list[tuple[float, float]]:
        return [(r, e[key]) for r, e in sorted(self.rounds.items()) if _is_num(e.get(key))]

    def per_silo(self, key: str, suffix: str = "") -> Series:
        out: Series = {}
        for name, rows in sorted(self.silo.items()):
            pts = [(r, row[key]) for r, row in sorted(rows.items()) if _is_num(row.get(key))]
            if pts and not (key in _GPU_KEYS and all(v == 0 for _, v in pts)):
                out[name + suffix] = pts
        return out


_GPU_KEYS = frozenset(protocol.GPU_USAGE_FIELDS)


def _is_num(v: Any) -> bool:
    return finite_number(v) is not None


def _metric_label(name: str) -> str:
    """A metric's name for people: macro_f1 -> macro-F1, predicted_neutral -> answers neutral."""
    if name.startswith("predicted_"):
        return "answers " + name.removeprefix("predicted_")
    return {"macro_f1": "macro-F1", "eval_loss": "evaluation loss"}.get(name, name.replace("_", " "))


def _is_score(name: str) -> bool:
    """Accuracy-like metrics (fractions where higher is better): drawn together on 0..100 %."""
    low = name.lower()
    return "acc" in low or "f1" in low


_EMPTY = {
    "loss": "no round has finished and no silo has reported a training loss yet.",
    "scores": "no evaluation with an accuracy or F1 in these events: a federated run evaluates only "
    "the loss, on the silos' held-out slices (eval-fraction > 0); `silotune demo` adds the "
    "accuracy and macro-F1 of the base model and of its adapter on held-out items.",
    "other": "no evaluation metric besides accuracy: the silos report an evaluation loss only "
    "when their node config sets eval-fraction > 0.",
    "rounds": "no round has finished yet.",
    "silos": "no silo has reported a result yet.",
    "memory": "the silos reported no memory figures.",
    "throughput": "the silos reported no throughput (tokens per second).",
}


def budget_chart(d: RunData) -> str:
    """Cumulative payload bytes on the run's own scale; the budget as text, drawn only when it is
    near enough to be seen (a 195 GiB default would flatten a demo's few MiB to zero)."""
    cumulative = d.per_round("cumulative_bytes")
    budget = d.run.get("comm_budget_bytes")
    title = "Cumulative bytes vs budget"
    series: Series = {"cumulative": cumulative}
    if not _is_num(budget):
        note = "the run recorded no communication budget"
    elif budget <= 0:
        note = "no communication budget (comm-budget-mb = 0: unlimited)"
    else:
        used = max((v for _, v in cumulative), default=0.0)
        note = f"budget {_fmt(budget, 'bytes')}: {_percent(used / budget)} used"
        if cumulative and budget <= 4 * used:
            series["budget"] = [(r, float(budget)) for r, _ in cumulative]
        elif cumulative:
            note += ", far above this scale (not drawn)"
    return line_chart(title, series, "bytes", empty=_EMPTY["rounds"], note=note)


def _percent(x: float) -> str:
    """A share as a percentage that never rounds a non-zero share to 0 (0.0043%, 12.5%)."""
    if x == 0 or x >= 0.001:
        return f"{100 * x:.2f}%"
    return f"{100 * x:.2g}%"


def charts(d: RunData) -> list[str]:
    loss: Series = {}
    if d.per_round("train_loss"):
        loss["federation"] = d.per_round("train_loss")
    loss.update(d.per_silo("train_loss"))
    evaluation: Series = defaultdict(list)
    for rnd, vals in sorted(d.evaluation.items()):
        for name, value in vals.items():
            evaluation[name].append((rnd, value))
    label = _metric_label
    scores = {label(k): v for k, v in evaluation.items() if _is_score(k)}
    other = [k for k in evaluation if not _is_score(k) and k != "examples"]
    other_eval = {label(k): evaluation[k] for k in other}
    shares = bool(other) and all(k.startswith("predicted_") for k in other)
    scores_note = "round 0: the base model, before any training" if 0 in d.evaluation else ""
    memory: Series = {}
    for key, label in (
        (protocol.PEAK_GPU_ALLOCATED, " GPU alloc"),
        (protocol.PEAK_GPU_RESERVED, " GPU reserved"),
        (protocol.PEAK_RSS, " RSS"),
    ):
        memory.update(d.per_silo(key, label))
    return [
        line_chart("Training loss per round", loss, empty=_EMPTY["loss"]),
        line_chart(
            "Accuracy and macro-F1 (evaluation)", scores, "share", empty=_EMPTY["scores"], note=scores_note
        ),
        line_chart(
            "Answers per label (evaluation)" if shares else "Other evaluation metrics",
            other_eval,
            "share" if shares else "",
            empty=_EMPTY["other"],
            note="share of each predicted label on the held-out items" if shares else "",
        ),
        line_chart(
            "Adapter payload bytes per round",
            {"uplink": d.per_round("uplink_bytes"), "downlink": d.per_round("downlink_bytes")},
            "bytes",
            empty=_EMPTY["rounds"],
        ),
        budget_chart(d),
        line_chart(
            "Uplink bytes per silo and round", d.per_silo("uplink_bytes"), "bytes", empty=_EMPTY["silos"]
        ),
        line_chart("Peak memory per silo and round", memory, "bytes", empty=_EMPTY["memory"]),
        line_chart("Tokens per second per silo", d.per_silo("tokens_per_second"), empty=_EMPTY["throughput"]),
        *privacy_chart(d),
    ]


def privacy_chart(d: RunData) -> list[str]:
    """Epsilon spent per silo and round (silos with [privacy] only; no chart when none has it)."""
    spent = d.per_silo(protocol.DP_EPSILON_SPENT)
    if not spent:
        return []
    budgets = d.per_silo(protocol.DP_EPSILON_BUDGET, " budget")
    return [line_chart("Privacy: epsilon spent per silo", {**spent, **budgets}, empty="")]


def _table(head: list[str], rows: list[list[Any]]) -> str:
    esc = html.escape
    th = "".join(f"<th>{esc(h)}</th>" for h in head) if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{body}</table>"


def summary(d: RunData) -> str:
    total = max((e.get("cumulative_bytes") or 0 for e in d.rounds.values()), default=0)
    budget = d.run.get("comm_budget_bytes") or 0
    used = f" ({_percent(total / budget)} of {_fmt(budget, 'bytes')})" if budget else ""
    run = [
        ["run id", d.run.get("run_id", "not recorded")],
        ["strategy / PEFT", f"{d.run.get('strategy', '?')} / {d.run.get('peft_method', '?')}"],
        ["rounds completed / planned", f"{len(d.rounds)} / {d.run.get('num_rounds', '?')}"],
        ["status", d.end.get("status", "running or interrupted")],
        ["adapter payload bytes", f"{_fmt(total, 'bytes')}{used}"],
    ]
    silos = []
    for name, rows in sorted(d.silo.items()):
        ups = sum(r.get("uplink_bytes") or 0 for r in rows.values())
        downs = sum(r.get("downlink_bytes") or 0 for r in rows.values())
        silos.append(
            [name, len(rows), _fmt(ups, "bytes"), _fmt(downs, "bytes"), d.failures.get(name, 0),
             d.rejected.get(name, 0)]
        )  # fmt: skip
    return (
        _table(["", ""], run)
        + _table(["silo", "rounds", "uplink", "downlink", "failed", "rejected"], silos)
        + privacy_table(d)
        + evaluation_table(d)
    )


def privacy_table(d: RunData) -> str:
    """Per silo with [privacy] in its policy: the epsilon spent after its last round, its budget."""
    rows = []
    for name, by_round in sorted(d.silo.items()):
        dp = [r for _, r in sorted(by_round.items()) if _is_num(r.get(protocol.DP_EPSILON_SPENT))]
        if not dp:
            continue
        last = dp[-1]
        spent, budget = last[protocol.DP_EPSILON_SPENT], last.get(protocol.DP_EPSILON_BUDGET)
        share = _percent(spent / budget) if _is_num(budget) and budget > 0 else ""
        run_eps = last.get(protocol.DP_EPSILON_RUN)
        rows.append(
            [name, f"{spent:.3g}", f"{budget:g}" if _is_num(budget) else "", share,
             f"{run_eps:.3g}" if _is_num(run_eps) else "", f"{last.get(protocol.DP_DELTA, 0):g}"]
        )  # fmt: skip
    if not rows:
        return ""
    head = ["silo (DP)", "epsilon spent", "budget", "used", "epsilon this run", "delta"]
    return _table(head, rows)


def evaluation_table(d: RunData) -> str:
    """Accuracy-like metrics per evaluated round (before/after for the demo), as numbers."""
    rounds = {r: v for r, v in sorted(d.evaluation.items()) if any(_is_score(k) for k in v)}
    if not rounds:
        return ""
    names = sorted({k for v in rounds.values() for k in v if _is_score(k)})
    shares = sorted({k for v in rounds.values() for k in v if k.startswith("predicted_")})
    has_n = any("examples" in v for v in rounds.values())
    items = ["items"] if has_n else []
    head = ["evaluated", *map(_metric_label, names), *items, *map(_metric_label, shares)]
    rows = []
    for rnd, vals in rounds.items():
        what = d.evaluated.get(rnd, "")
        label = f"round {rnd:g}" + (f": {what}" if what else "")
        cells: list[Any] = [label]
        cells += [_fmt(vals[k], "share") if k in vals else "" for k in names]
        cells += [f"{vals['examples']:g}" if "examples" in vals else ""] if has_n else []
        cells += [_fmt(vals[k], "share") if k in vals else "" for k in shares]
        rows.append(cells)
    return _table(head, rows)


_CSS = """body{font:14px sans-serif;margin:24px;color:#222}h1{font-size:20px}
table{border-collapse:collapse;margin:8px 16px 16px 0;display:inline-table;vertical-align:top}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.charts{display:flex;flex-wrap:wrap}
.chart{margin:6px;background:#fff;border:1px solid #ddd}.frame{fill:none;stroke:#999}
.g{stroke:#eee}.t{font-weight:bold;font-size:14px}.yl{font-size:11px;text-anchor:end}
.xl{font-size:11px;text-anchor:middle}.lg{font-size:11px}.n{font-size:11px;fill:#555}.empty{margin:6px;padding:12px;
width:540px;border:1px dashed #ccc;color:#666}"""


def render_html(d: RunData, source: str, name: str = "") -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>SiloTune run {html.escape(str(d.run.get('run_id', name)))}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>SiloTune run report</h1><p>From {html.escape(source)}, generated {stamp}.</p>"
        f"{summary(d)}<div class='charts'>{''.join(charts(d))}</div></body></html>"
    )


def write_report(run_dir: Path, silo_events: list[Path] | None = None, out: Path | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html) and return its path."""
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no events file; pass the run directory of a SiloTune run")
    events = list(read_events(path))
    for extra in silo_events or []:
        if not Path(extra).is_file():
            raise UserError(f"--silo-events {extra}: file not found")
        events += list(read_events(Path(extra)))
    if not events:
        raise UserError(f"{path}: no complete events yet; is the run still starting?")
    out = Path(out) if out else Path(run_dir) / "report.html"
    html_text = render_html(RunData(events), str(path), Path(run_dir).resolve().name)
    atomic_write_text(out, html_text)
    return out
