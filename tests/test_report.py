"""`silotune report`: self-contained HTML with inline SVG plots; renders in headless Chromium."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from monitoring.report import write_report
from silotune.errors import UserError
from silotune.events import EventLog
from tests.support.synthetic_run import write_synthetic_run

CHART_BLUE, CHART_RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)  # first two series colours


@pytest.fixture
def report(tmp_path: Path) -> Path:
    silo_dirs = {"hospital-a": tmp_path / "a"}
    write_synthetic_run(tmp_path / "run", tmp_path / "ev", silo_dirs)
    return write_report(tmp_path / "run", [tmp_path / "a" / "silo.jsonl"])


def test_report_is_self_contained_and_complete(report: Path) -> None:
    text = report.read_text()
    assert report.name == "report.html"
    assert text.count('<svg class="chart"') == 8 and text.count("<polyline") >= 15
    # Nothing external to fetch: no scripts, links or remote images.
    assert not re.search(r"<script|<link|<img|\bsrc=|\bhref=|url\(", text)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for title in ("Training loss", "Accuracy", "payload bytes", "Peak memory", "vs budget"):
        assert title in text
    assert "no data" not in text.split("Other evaluation")[0]
    assert "<td>bank-c</td><td>2</td>" in text  # rounds answered; the failure is mapped by node
    assert "83.56% of" in text  # cumulative bytes against the run's budget
    for secret in ("secret reason", "nan norm", "/private/path"):
        assert secret not in text


def _demo_like_run(run_dir: Path, evaluation: bool = True) -> None:
    """What `silotune demo` leaves: the default budget (200,000 MB = 195 GiB), a few MiB per round,
    no federated evaluation, and (when ``evaluation``) the demo's before/after held-out scores."""
    log = EventLog("server", [run_dir / "events.jsonl"])
    log.emit("run_start", run_id=7, num_rounds=3, strategy="fedavg", peft_method="lora",
             comm_budget_bytes=200_000 * 1024 * 1024)  # fmt: skip
    per_round = 11_117_826  # both directions, 3 silos: the demo's packed fp32 adapter
    for rnd in (1, 2, 3):
        for i, name in enumerate(("hospital-a", "bank-b", "clinic-c")):
            log.emit("silo_result", round=rnd, node_id=10 + i, silo=name, uplink_bytes=per_round // 6,
                     downlink_bytes=per_round // 6, train_loss=2.0 / rnd, tokens_per_second=300.0 + i,
                     peak_rss_bytes=2.5e9)  # fmt: skip
        log.emit("round_end", round=rnd, uplink_bytes=per_round / 2, downlink_bytes=per_round / 2,
                 cumulative_bytes=per_round * rnd, train_loss=2.0 / rnd, answered=3, sampled=3)  # fmt: skip
    log.emit("run_end", status="completed", rounds_completed=3, adapter_dir="/x")
    if evaluation:
        demo = EventLog("demo", [run_dir / "events.jsonl"])
        for rnd, what, acc, f1, shares in (
            (0, "base model", 0.3, 0.27, (0.35, 0.15, 0.5)),
            (3, "federated adapter", 0.71, 0.58, (0.12, 0.7, 0.18)),
        ):
            demo.emit("evaluation", round=rnd, model=what, metrics={
                "accuracy": acc, "macro_f1": f1, "examples": 300, "predicted_negative": shares[0],
                "predicted_neutral": shares[1], "predicted_positive": shares[2]})  # fmt: skip


def _chart(text: str, title: str) -> str:
    start = text.index(f'aria-label="{title}"')
    return text[start : text.index("</svg>", start)]


def test_demo_run_report_has_before_after_scores_and_no_empty_panel(tmp_path: Path) -> None:
    _demo_like_run(tmp_path)
    text = write_report(tmp_path).read_text()
    assert text.count('<svg class="chart"') == 8 and 'class="empty"' not in text
    table = text[text.index("<th>evaluated</th>") :]
    table = table[: table.index("</table>")]
    assert "<th>accuracy</th><th>macro-F1</th><th>items</th><th>answers negative</th>" in table
    assert "<td>round 0: base model</td><td>30%</td><td>27%</td><td>300</td><td>35%</td>" in table
    assert "<td>round 3: federated adapter</td><td>71%</td><td>58%</td><td>300</td>" in table
    scores = _chart(text, "Accuracy and macro-F1 (evaluation)")
    assert "accuracy round 3: 71%" in scores and "macro-F1 round 0: 27%" in scores
    assert "round 0: the base model, before any training" in scores
    answers = _chart(text, "Answers per label (evaluation)")
    assert "answers neutral round 3: 70%" in answers


def _polyline_ys(svg: str) -> list[list[float]]:
    return [
        [float(pt.split(",")[1]) for pt in m.group(1).split()]
        for m in re.finditer(r'<polyline points="([^"]+)"', svg)
    ]


def test_budget_chart_scales_to_the_run_and_states_a_far_budget_as_text(tmp_path: Path) -> None:
    _demo_like_run(tmp_path)
    text = write_report(tmp_path).read_text()
    chart = _chart(text, "Cumulative bytes vs budget")
    assert "budget 195 GiB: 0.016% used, far above this scale (not drawn)" in chart
    (cumulative,) = _polyline_ys(chart)  # the budget line is not drawn on this scale
    frame = re.search(r'<rect x="\d+" y="(\d+)" width="\d+" height="(\d+)" class="frame"/>', chart)
    assert frame is not None
    height = float(frame.group(2))
    # Round 1 -> 3 spans most of the plot: the run's bytes are visible, not flattened at zero.
    assert max(cumulative) - min(cumulative) > 0.5 * height
    assert "MiB" in chart and "GiB" not in chart.split("</text>", 2)[-1]  # axis in MiB
    assert "0.016% of 195 GiB" in text  # the summary table says it too


def test_budget_chart_draws_a_budget_within_reach(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "run", tmp_path / "ev", {})
    chart = _chart(write_report(tmp_path / "run").read_text(), "Cumulative bytes vs budget")
    assert len(_polyline_ys(chart)) == 2 and ">budget<" in chart and "budget 977 KiB: 83.56% used" in chart


def test_empty_panels_say_why(tmp_path: Path) -> None:
    _demo_like_run(tmp_path, evaluation=False)
    text = write_report(tmp_path).read_text()
    empties = re.findall(r'<div class="empty"><b>([^<]+)</b>: ([^<]+)</div>', text)
    assert [title for title, _ in empties] == [
        "Accuracy and macro-F1 (evaluation)",
        "Other evaluation metrics",
    ]
    assert all("eval-fraction" in why for _, why in empties)
    assert "no data in these events" not in text


def test_scores_in_percent_and_a_run_without_budget(tmp_path: Path) -> None:
    log = EventLog("server", [tmp_path / "events.jsonl"])
    log.emit("run_start", run_id=1, num_rounds=1)  # no comm_budget_bytes (an older run)
    log.emit("round_end", round=1, uplink_bytes=10, downlink_bytes=10, cumulative_bytes=20)
    log.emit("evaluation", round=1, metrics={"accuracy": 72.5})  # a percentage, not a fraction
    text = write_report(tmp_path).read_text()
    assert "accuracy round 1: 72.5</title>" in _chart(text, "Accuracy and macro-F1 (evaluation)")
    assert "the run recorded no communication budget" in _chart(text, "Cumulative bytes vs budget")


def test_report_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no events file"):
        write_report(tmp_path)
    (tmp_path / "events.jsonl").write_text('{"kind": "run_start"')  # partial line only
    with pytest.raises(UserError, match="no complete events"):
        write_report(tmp_path)


def test_report_cli(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "run", tmp_path / "ev", {})
    out = tmp_path / "r.html"
    res = subprocess.run(
        [sys.executable, "-m", "command_line.main", "report", str(tmp_path / "run"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert out.is_file() and str(out) in res.stdout


def decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for Chromium's screenshots (8-bit RGB/RGBA, not interlaced)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, hdr
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * bpp + 1)
    out, prev = np.zeros((h, w * bpp), np.uint8), np.zeros(w * bpp, np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:
            cur = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif f == 2:
            cur = line + prev
        else:  # Average / Paeth depend on the pixel to the left: sequential
            c, ln, pv = [0] * (w * bpp), line.tolist(), prev.tolist()
            for x in range(w * bpp):
                a = c[x - bpp] if x >= bpp else 0
                if f == 3:
                    c[x] = (ln[x] + (a + pv[x]) // 2) & 255
                    continue
                b, cc = pv[x], pv[x - bpp] if x >= bpp else 0
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                c[x] = (ln[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)) & 255
            cur = np.array(c, np.uint8)
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:  # fresh profile every run
        return subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    dom = chromium("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<svg class="chart"') == 8
    assert dom.stdout.count("<circle") >= 30
    shot = tmp_path / "shot.png"
    res = chromium("--window-size=1200,1300", f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = decode_png(shot.read_bytes())
    assert img.shape[:2] == (1300, 1200)
    non_white = np.any(img < 245, axis=2).mean()
    assert non_white > 0.03, f"screenshot looks blank ({non_white:.1%} non-white)"
    for colour in (CHART_BLUE, CHART_RED):
        assert np.all(img == colour, axis=2).sum() > 200, f"no plotted lines in {colour}"
