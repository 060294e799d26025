"""Flower's own wire-traffic accounting, polled from `flwr ls --format json` (central exporter).

Separate from the event tailer (monitoring/exporter.py): it shells out to the flwr CLI on a timer,
and without ``--flwr-connection`` it never runs at all.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from silotune import metrics as m
from silotune.events import finite_number
from silotune.flwr_connection import flower_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunTraffic:
    run_id: str
    inbound_bytes: float
    outbound_bytes: float
    pending_at: str


def parse_flwr_ls(text: str) -> list[RunTraffic]:
    """Per-run traffic from `flwr ls --format json` (flwr 1.41: runs[].network-traffic)."""
    start = text.find("{")  # tolerate log lines a wrapper may print before the JSON
    doc = json.loads(text[start:] if start >= 0 else text)
    if not isinstance(doc, dict) or not doc.get("success", False):
        raise ValueError(f"flwr ls did not succeed: {str(doc)[:200]}")
    runs = []
    for run in doc.get("runs", []):
        traffic = run.get("network-traffic") or {}
        runs.append(
            RunTraffic(
                run_id=str(run.get("run-id", "")),
                inbound_bytes=finite_number(traffic.get("inbound-bytes")) or 0.0,
                outbound_bytes=finite_number(traffic.get("outbound-bytes")) or 0.0,
                pending_at=str(run.get("pending-at", "")),
            )
        )
    return runs


class FlowerTrafficPoller:
    """Polls Flower's own per-run traffic accounting in a background thread (optional).

    Totals keep the largest value seen per run, so they never go down when the SuperLink forgets
    runs (in-memory state after a restart): a true counter, as Prometheus expects.
    """

    def __init__(
        self,
        connection: str,
        interval_s: float = 15.0,
        timeout_s: float = 30.0,
        flwr: str = "flwr",
        flwr_home: Path | None = None,
    ) -> None:
        self.cmd = [flwr, "ls", connection, "--format", "json"]
        # Air-gapped sites: no telemetry or update check from the poller's `flwr` calls.
        self.env = flower_env(flwr_home)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.per_run: dict[str, RunTraffic] = {}
        self.newest: RunTraffic | None = None
        self.ok = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def poll_once(self) -> bool:
        import subprocess

        try:
            out = subprocess.run(
                self.cmd,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=True,
                env=self.env,
            ).stdout
            runs = parse_flwr_ls(out)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("flwr ls failed (%s); wire-byte series keep their last values", exc)
            with self._lock:
                self.ok = False
            return False
        with self._lock:
            for run in runs:
                old = self.per_run.get(run.run_id)
                if old is not None:
                    run = RunTraffic(
                        run.run_id,
                        max(run.inbound_bytes, old.inbound_bytes),
                        max(run.outbound_bytes, old.outbound_bytes),
                        run.pending_at,
                    )
                self.per_run[run.run_id] = run
            if runs:
                self.newest = self.per_run[max(runs, key=lambda r: r.pending_at).run_id]
            self.ok = True
        return True

    def start(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.is_set():
                self.poll_once()
                self._stop.wait(self.interval_s)

        thread = threading.Thread(target=loop, name="flwr-ls-poller", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            runs, newest, ok = list(self.per_run.values()), self.newest, self.ok
        for d, total in (
            (m.WIRE_IN, sum(r.inbound_bytes for r in runs)),
            (m.WIRE_OUT, sum(r.outbound_bytes for r in runs)),
        ):
            family = CounterMetricFamily(d.name, d.help)
            family.add_metric([], total)
            yield family
        if newest is not None:
            for d, value in (
                (m.WIRE_RUN_IN, newest.inbound_bytes),
                (m.WIRE_RUN_OUT, newest.outbound_bytes),
            ):
                yield GaugeMetricFamily(d.name, d.help, value=value)
        yield GaugeMetricFamily(m.WIRE_POLL_OK.name, m.WIRE_POLL_OK.help, value=float(ok))
