"""Real monitoring processes for tests: exporters, a Prometheus that scrapes them, a fake
`flwr ls`, and the dashboards' queries."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

# Captured from flwr 1.41 `flwr ls --format json` against a local insecure flower-superlink with
# one SuperNode: a run that moved 200,000 payload bytes up and 100,000 down, and two without nodes.
FLWR_LS_JSON = """{
  "success": true,
  "runs": [
    {"run-id": "715974047237713702", "federation-id": "@none/default",
     "fab-id": "captest/capapp", "fab-name": "capapp", "fab-version": "1.0.0",
     "fab-hash": "ff2533d739ff1b517e8c66f208bd54bf75ca43387da1dad774ea5fe3b9608658",
     "status": "finished:completed", "status-details": "N/A", "elapsed": 7.481688,
     "pending-at": "2026-11-22 03:28:51Z", "starting-at": "2026-11-22 03:28:51Z",
     "running-at": "2026-11-22 03:28:54Z", "finished-at": "2026-11-22 03:29:02Z",
     "network-traffic": {"inbound-bytes": 201390, "outbound-bytes": 101663,
                         "total-bytes": 303053},
     "compute-time": {"serverapp-seconds": 7.481688, "clientapp-seconds": 0.0672140121459961,
                      "total-seconds": 7.548902012145996}},
    {"run-id": "487746571464526860", "federation-id": "@none/default",
     "fab-id": "captest/capapp", "fab-name": "capapp", "fab-version": "1.0.0",
     "fab-hash": "390f0565", "status": "finished:failed", "status-details": "N/A",
     "elapsed": 1.252341, "pending-at": "2026-11-22 03:28:13Z",
     "starting-at": "2026-11-22 03:28:13Z", "running-at": "2026-11-22 03:28:16Z",
     "finished-at": "2026-11-22 03:28:17Z",
     "network-traffic": {"inbound-bytes": 0, "outbound-bytes": 0, "total-bytes": 0},
     "compute-time": {"serverapp-seconds": 1.252341, "clientapp-seconds": 0.0,
                      "total-seconds": 1.252341}}
  ]
}"""


def fake_flwr(tmp_path: Path, payload: str) -> Path:
    """An executable that answers like `flwr ls --format json` with the given text."""
    (tmp_path / "ls.json").write_text(payload)
    exe = tmp_path / "flwr"
    exe.write_text(f"#!/bin/sh\ncat {tmp_path / 'ls.json'}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


MON = Path(__file__).resolve().parents[2] / "monitoring"


DASHBOARDS = sorted((MON / "grafana" / "dashboards").glob("*.json"))


def panel_targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    out = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append((sub["title"], target["expr"]))
    return out


SCRAPE_S = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop a process we started (its own session) by PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


@contextmanager
def exporter(
    events_dir: Path, role: str, log: Path, args: tuple[str, ...] = (), env: dict | None = None
) -> Iterator[str]:
    """Run `silotune exporter` on a free loopback port; yield HOST:PORT."""
    addr = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "command_line.main", "exporter", "--events-dir", str(events_dir)]
    cmd += ["--role", role, "--bind", addr, *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    try:
        wait_http(f"http://{addr}/metrics")
        yield addr
    finally:
        stop(proc)


def prometheus_config(tmp: Path, central: str, silos: list[str]) -> Path:
    """The repository's central config with test targets, 1 s intervals and absolute rule paths."""
    cfg = yaml.safe_load((MON / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    cfg["rule_files"] = [str(MON / "prometheus" / r) for r in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["silotune-central"]["static_configs"] = [{"targets": [central]}]
    (tmp / "silos.yml").write_text(yaml.safe_dump([{"targets": silos}]))
    jobs["silotune-silo"]["file_sd_configs"] = [{"files": [str(tmp / "silos.yml")]}]
    cfg["scrape_configs"] = [jobs["silotune-central"], jobs["silotune-silo"]]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def prometheus(tmp: Path, central: str, silos: list[str], args: tuple[str, ...] = ()) -> Iterator[str]:
    """Run Prometheus on a free loopback port with ``tmp`` as its config and storage; ``args`` are
    extra flags. Skips the test when it is not installed."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (apt-get install --no-install-recommends prometheus)")
    tmp.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.1:{free_port()}"
    with open(tmp / "prometheus.log", "w") as fh:
        proc = subprocess.Popen(
            [exe, f"--config.file={prometheus_config(tmp, central, silos)}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={addr}", *args],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"http://{addr}/-/ready")
        yield addr
    finally:
        stop(proc)


def exposition(addr: str) -> str:
    """The raw text an exporter (or anything serving /metrics) answers a scrape with."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        return r.read().decode()


def api(prom: str, path: str, params: list[tuple[str, str]] | None = None) -> object:
    """The ``data`` of a Prometheus HTTP API answer (``status`` must be success)."""
    url = f"http://{prom}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


EVERY_SERIES = '{__name__=~".+"}'


def everything(prom: str, since: float) -> dict[str, object]:
    """Prometheus's answer for every series it has held since ``since`` (Unix seconds), by endpoint:
    the series and their label sets, every label name and every value of each, every sample of every
    series, the metric metadata (HELP texts), targets, alerts, rules, TSDB status and /federate."""
    window = [("start", str(int(since) - 60)), ("end", str(int(time.time()) + 60))]
    every = ("match[]", EVERY_SERIES)
    out: dict[str, object] = {
        "series": api(prom, "/api/v1/series", [every, *window]),
        "labels": api(prom, "/api/v1/labels", window),
    }
    for name in out["labels"]:  # type: ignore[union-attr]
        path = f"/api/v1/label/{urllib.parse.quote(name, safe='')}/values"
        out[f"label/{name}/values"] = api(prom, path, window)
    span = int(time.time() - since) + 60
    out["samples"] = api(prom, "/api/v1/query", [("query", f"{EVERY_SERIES}[{span}s]")])
    out["metadata"] = api(prom, "/api/v1/metadata")
    out["targets"] = api(prom, "/api/v1/targets", [("state", "any")])
    out["alerts"] = api(prom, "/api/v1/alerts")
    out["rules"] = api(prom, "/api/v1/rules")
    out["tsdb"] = api(prom, "/api/v1/status/tsdb")
    federate = f"http://{prom}/federate?" + urllib.parse.urlencode([every])
    with urllib.request.urlopen(federate, timeout=30) as r:
        out["federate"] = r.read().decode()
    return out


def query(prom: str, expr: str) -> list[dict]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def values(prom: str, expr: str) -> dict[str, float]:
    """{silo label (or ''): value} of an instant query."""
    return {s["metric"].get("silo", ""): float(s["value"][1]) for s in query(prom, expr)}


def wait_until(prom: str, expr: str, timeout_s: float = 60.0) -> list[dict]:
    """Poll until expr returns data (first scrape comes a few seconds after start)."""
    end = time.monotonic() + timeout_s
    while True:
        result = query(prom, expr)
        if result or time.monotonic() > end:
            return result
        time.sleep(0.5)


def grafana_expr(expr: str, job: str = "silotune-central") -> str:
    """Substitute the dashboards' variables the way Grafana would for 'All silos'."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return expr.replace("$job", job).replace("$silo", ".*")


def empty_panels(prom: str, skip: frozenset[str] = frozenset()) -> list[str]:
    empty = []
    for path in DASHBOARDS:
        by_panel: dict[str, bool] = {}
        for title, expr in panel_targets(json.loads(path.read_text())):
            ok = bool(query(prom, grafana_expr(expr)))
            by_panel[title] = by_panel.get(title, False) or ok
            # Every query of a panel must work, except series only GPU or flwr ls provide.
            gated = re.search(r"gpu|nvml|flower_traffic", expr)
            if not ok and not gated and title not in skip:
                empty.append(f"{path.name}: {title}: {expr}")
        empty += [f"{path.name}: {t} (all queries)" for t, ok in by_panel.items() if not ok and t not in skip]
    return empty
