"""Exporter unit tests: synthetic events in, exact values out; partial lines, truncation,
rotation, restart; Flower traffic parsing; the served text passes `promtool check metrics`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.exporter import build_registry
from monitoring.flwr_traffic import FlowerTrafficPoller, parse_flwr_ls
from silotune import metrics as m
from silotune.events import EventLog
from tests.support.monitoring_stack import FLWR_LS_JSON, fake_flwr
from tests.support.synthetic_run import ADAPTER_PARAMS, BUDGET_BYTES, ROUNDS, write_synthetic_run


def scrape(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse exposition text back into {(sample name, sorted labels): value}."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def silo(name: str) -> tuple[tuple[str, str], ...]:
    return (("silo", name),)


def test_values_equal_what_was_written(tmp_path: Path) -> None:
    truth = write_synthetic_run(tmp_path / "run", tmp_path / "ev", {})
    reg, _ = build_registry(tmp_path / "ev" / "server.jsonl", "server", 5.0)
    v = scrape(reg)
    for name in ("hospital-a", "hospital-b", "bank-c"):
        assert v[(m.UPLINK_BYTES.name, silo(name))] == truth.uplink[name]
        assert v[(m.DOWNLINK_BYTES.name, silo(name))] == truth.downlink[name]
        assert v[(m.SILO_ROUNDS.name, silo(name))] == truth.results[name]
        assert v[(m.SILO_TRAIN_LOSS.name, silo(name))] == pytest.approx(truth.last_loss[name])
    assert v[(m.SILO_FAILURES.name, silo("bank-c"))] == 1  # node id mapped to the silo name
    assert v[(m.SILO_FAILURES.name, silo("hospital-a"))] == 0  # initialised, so increase() works
    assert v[(m.UPDATES_REJECTED.name, silo("bank-c"))] == 1
    assert v[(m.COMM_BYTES.name, ())] == truth.cumulative
    assert v[(m.COMM_BUDGET.name, ())] == BUDGET_BYTES  # the run's budget wins over the flag
    assert v[(m.ROUNDS_COMPLETED.name, ())] == ROUNDS == truth.rounds_completed
    assert v[(m.ROUND.name, ())] == ROUNDS
    assert v[(m.RUN_ACTIVE.name, ())] == 0
    assert v[(m.SILOS_FAILED.name, ())] == 0  # last round: everybody answered
    assert v[(m.SILOS_ANSWERED.name, ())] == 3
    assert v[(m.EVALUATION.name, (("metric", "accuracy"),))] == pytest.approx(truth.accuracy)
    assert v[(m.SILO_GPU_RESERVED.name, silo("hospital-a"))] == truth.gpu_reserved
    assert (m.SILO_GPU_RESERVED.name, silo("hospital-b")) not in v  # null fields stay absent
    assert v[(m.SILO_PEAK_RSS.name, silo("hospital-b"))] == 2e9 + 1e6 * ROUNDS
    assert v[(m.RUN_INFO.name, (("peft_method", "lora"), ("run_id", "4242"), ("strategy", "fedavg")))]
    assert v[(m.ADAPTER_PARAMETERS.name, ())] == ADAPTER_PARAMS
    assert v[(m.SILO_LORA_RANK.name, silo("bank-c"))] == 8


def test_no_text_content_is_exported(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "run", tmp_path / "ev", {})
    reg, _ = build_registry(tmp_path / "ev" / "server.jsonl", "server", 5.0)
    text = generate_latest(reg).decode()
    for secret in ("secret reason", "nan norm", "/private/path", "tiny"):
        assert secret not in text


def test_silo_role_reads_local_train(tmp_path: Path) -> None:
    truth = write_synthetic_run(tmp_path / "run", tmp_path / "ev", {"hospital-a": tmp_path / "a"})
    reg, _ = build_registry(tmp_path / "a" / "silo.jsonl", "silo", 5.0)
    v = scrape(reg)
    assert v[(m.UPLINK_BYTES.name, silo("hospital-a"))] == truth.uplink["hospital-a"]
    assert v[(m.EXPORTER_INFO.name, (("role", "silo"),))] == 1
    assert not any(k[0] == m.ROUND.name for k in v)  # no federation series at a silo


def test_partial_line_waits_until_complete(tmp_path: Path) -> None:
    path = tmp_path / "server.jsonl"
    reg, collector = build_registry(path, "server", 5.0)  # file does not exist yet
    assert (m.UPLINK_BYTES.name, silo("s1")) not in scrape(reg)
    line = json.dumps({"ts": 1.0, "kind": "silo_result", "silo": "s1", "uplink_bytes": 7}) + "\n"
    with open(path, "w") as fh:
        fh.write(line[:20])
    assert (m.UPLINK_BYTES.name, silo("s1")) not in scrape(reg)
    with open(path, "a") as fh:
        fh.write(line[20:])
    assert scrape(reg)[(m.UPLINK_BYTES.name, silo("s1"))] == 7
    with open(path, "a") as fh:
        fh.write("{not json}\n")
    v = scrape(reg)
    assert v[(m.MALFORMED_LINES.name, ())] == 1
    assert v[(m.UPLINK_BYTES.name, silo("s1"))] == 7


def test_cpu_silo_zero_gpu_fields_are_not_exported(tmp_path: Path) -> None:
    log = EventLog("silo", [tmp_path / "silo.jsonl"])
    zeros = dict.fromkeys(["peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes", "nvml_used_bytes"], 0)
    log.emit("local_train", round=1, silo="cpu", gpu_total_bytes=0, peak_rss_bytes=9, **zeros)
    v = scrape(build_registry(tmp_path / "silo.jsonl", "silo", 5.0)[0])
    assert v[(m.SILO_PEAK_RSS.name, silo("cpu"))] == 9
    assert not any("gpu" in k[0] or "nvml" in k[0] for k in v)


def _result(log: EventLog, name: str, up: int) -> None:
    log.emit("silo_result", round=1, node_id=1, silo=name, uplink_bytes=up, downlink_bytes=up)


def _followed_log(tmp_path: Path, first_up: int) -> tuple[Path, EventLog, Callable[[], float]]:
    """A server events file with one s1 result, an exporter following it, and s1's uplink counter."""
    path = tmp_path / "server.jsonl"
    log = EventLog("server", [path])
    _result(log, "s1", first_up)
    reg, _ = build_registry(path, "server", 5.0)
    return path, log, lambda: scrape(reg)[(m.UPLINK_BYTES.name, silo("s1"))]


def test_truncation_and_rotation_keep_counters(tmp_path: Path) -> None:
    path, log, uplink = _followed_log(tmp_path, 10)
    assert uplink() == 10
    path.write_text("")  # copytruncate-style rotation
    _result(log, "s1", 5)
    assert uplink() == 15
    _result(log, "s1", 1)  # written to the old file just before it is renamed away
    os.rename(path, tmp_path / "server.jsonl.1")
    _result(log, "s1", 100)  # new file
    assert uplink() == 116


def test_truncation_refilled_past_the_old_offset_between_polls(tmp_path: Path) -> None:
    # The size check alone misses this: the refilled file is longer than what was read before.
    path, log, uplink = _followed_log(tmp_path, 1)
    assert uplink() == 1
    old_size = path.stat().st_size
    path.write_text("")
    _result(log, "s1", 20)
    _result(log, "s1", 300)
    assert path.stat().st_size > old_size
    assert uplink() == 321
    _result(log, "s1", 4000)  # plain appends after that are read once
    assert uplink() == 4321


def test_restart_rebuilds_identical_values(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "run", tmp_path / "ev", {})
    first, _ = build_registry(tmp_path / "ev" / "server.jsonl", "server", 5.0)
    before = scrape(first)
    second, _ = build_registry(tmp_path / "ev" / "server.jsonl", "server", 5.0)
    assert scrape(second) == before  # counters do not reset across exporter restarts


def test_parse_flwr_ls_real_output() -> None:
    runs = parse_flwr_ls(FLWR_LS_JSON)
    assert [r.run_id for r in runs] == ["715974047237713702", "487746571464526860"]
    assert runs[0].inbound_bytes == 201390 and runs[0].outbound_bytes == 101663
    assert parse_flwr_ls('{"success": true, "runs": []}') == []
    with pytest.raises(ValueError):
        parse_flwr_ls('{"success": false, "error-message": "no connection"}')


def test_poller_totals_never_decrease(tmp_path: Path) -> None:
    exe = fake_flwr(tmp_path, FLWR_LS_JSON)
    poller = FlowerTrafficPoller("lab", flwr=str(exe))
    reg, _ = build_registry(tmp_path / "none.jsonl", "server", 5.0, poller.collect)
    assert scrape(reg)[(m.WIRE_POLL_OK.name, ())] == 0
    assert poller.poll_once()
    v = scrape(reg)
    assert v[(m.WIRE_IN.name, ())] == 201390 and v[(m.WIRE_OUT.name, ())] == 101663
    assert v[(m.WIRE_RUN_IN.name, ())] == 201390 and v[(m.WIRE_POLL_OK.name, ())] == 1
    (tmp_path / "ls.json").write_text('{"success": true, "runs": []}')  # SuperLink restarted
    assert poller.poll_once()
    assert scrape(reg)[(m.WIRE_IN.name, ())] == 201390
    (tmp_path / "ls.json").write_text("garbage")
    assert not poller.poll_once()
    assert scrape(reg)[(m.WIRE_POLL_OK.name, ())] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_metrics(port: int, deadline_s: float = 30.0) -> str:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


def test_cli_exporter_serves_and_passes_promtool(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "run", tmp_path / "ev", {})
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "command_line.main", "exporter", "--events-dir", str(tmp_path / "ev"),
         "--role", "server", "--bind", f"127.0.0.1:{port}", "--budget-mb", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        text = fetch_metrics(port)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert f'silotune_uplink_bytes_total{{silo="hospital-a"}} {ADAPTER_PARAMS * 4 * ROUNDS}.0' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
