"""A real Prometheus (127.0.0.1, temp config derived from monitoring/prometheus/prometheus.yml)
scrapes real exporter processes; scraped values must equal independently computed truth, every
Grafana panel's PromQL must return data, and the alert rules must fire where the data says so.

The helpers here are reused by test_monitoring_e2e.py (the real-federation run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
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

from tests.test_exporter import FLWR_LS_JSON, fake_flwr
from tests.test_monitoring_config import DASHBOARDS, MON, panel_targets
from tests.test_monitoring_synthetic import ADAPTER_PARAMS, ROUNDS, write_synthetic_run

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
def prometheus(tmp: Path, central: str, silos: list[str]) -> Iterator[str]:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (apt-get install --no-install-recommends prometheus)")
    tmp.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.1:{free_port()}"
    with open(tmp / "prometheus.log", "w") as fh:
        proc = subprocess.Popen(
            [exe, f"--config.file={prometheus_config(tmp, central, silos)}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={addr}"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"http://{addr}/-/ready")
        yield addr
    finally:
        stop(proc)


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


def test_prometheus_scrapes_synthetic_exporters(tmp_path: Path) -> None:
    silo_dirs = {"hospital-a": tmp_path / "silo-a", "hospital-b": tmp_path / "silo-b"}
    truth = write_synthetic_run(tmp_path / "run", tmp_path / "central", silo_dirs)
    flwr_dir = tmp_path / "bin"
    flwr_dir.mkdir()
    fake_flwr(flwr_dir, FLWR_LS_JSON)
    fake = str(flwr_dir / "flwr")
    with (
        exporter(tmp_path / "central", "server", tmp_path / "central.log",
                 ("--flwr-connection", "lab", "--flwr-poll-seconds", "1", "--flwr-command", fake)
                 ) as central,
        exporter(silo_dirs["hospital-a"], "silo", tmp_path / "a.log") as silo_a,
        exporter(silo_dirs["hospital-b"], "silo", tmp_path / "b.log") as silo_b,
        prometheus(tmp_path / "prom", central, [silo_a, silo_b]) as prom,
    ):  # fmt: skip
        assert wait_until(prom, 'count(up{job=~"silotune-.*"} == 1) == 3')
        # rate()/increase() panels need at least two samples of every target.
        assert wait_until(prom, 'count(count_over_time(up{job=~"silotune-.*"}[1m]) >= 3) == 3')
        # Rules need a couple of evaluations after the first scrape.
        assert wait_until(prom, 'ALERTS{alertname="SiloTuneCommBudgetNear"}', 30)
        central_q = '{job="silotune-central"}'
        assert values(prom, f"silotune_uplink_bytes_total{central_q}") == truth.uplink
        assert values(prom, f"silotune_downlink_bytes_total{central_q}") == truth.downlink
        assert values(prom, f"silotune_comm_bytes{central_q}") == {"": truth.cumulative}
        assert values(prom, f"silotune_rounds_completed{central_q}") == {"": ROUNDS}
        assert values(prom, 'silotune_evaluation_value{metric="accuracy"}') == pytest.approx(
            {"": truth.accuracy}
        )
        assert values(prom, "silotune_flower_traffic_inbound_bytes_total") == {"": 201390}
        silo_up = values(prom, 'silotune_uplink_bytes_total{job="silotune-silo"}')
        assert silo_up == {n: truth.uplink[n] for n in silo_dirs}
        assert silo_up["hospital-a"] == ADAPTER_PARAMS * 4 * ROUNDS
        firing = {a["metric"]["alertname"] for a in query(prom, 'ALERTS{alertstate="firing"}')}
        assert {
            "SiloTuneCommBudgetNear",
            "SiloTuneGpuMemoryNearCapacity",
            "SiloTuneUpdateRejected",
            "SiloTuneSiloFailedRound",
        } <= firing
        assert "SiloTuneSiloDown" not in firing
        assert not empty_panels(prom)
