"""A real Prometheus (127.0.0.1, temp config derived from monitoring/prometheus/prometheus.yml)
scrapes real exporter processes; scraped values must equal independently computed truth, every
Grafana panel's PromQL must return data, and the alert rules must fire where the data says so.

The helpers here are reused by test_monitoring_e2e.py (the real-federation run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.monitoring_stack import (
    FLWR_LS_JSON,
    empty_panels,
    exporter,
    fake_flwr,
    prometheus,
    query,
    values,
    wait_until,
)
from tests.support.synthetic_run import ADAPTER_PARAMS, ROUNDS, write_synthetic_run


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
