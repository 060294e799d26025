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
