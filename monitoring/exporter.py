"""Long-lived Prometheus exporter that tails the JSONL event files of short-lived Flower apps.

Why a tailer: ServerApp/ClientApp processes live for one run, so they cannot hold a /metrics
endpoint. They append events (silotune.events); this process outlives runs, re-reads the log
from the start when it (re)starts, so its counters come back with the same values after a
restart, and follows the file afterwards. Only numbers and low-cardinality labels leave it: no
prompt, text, path or failure reason is ever exported.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from silotune import metrics as m
from silotune import protocol
from silotune.events import finite_number
from silotune.silo_failures import SiloFailure

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# The first bytes of a followed file, kept to notice a copytruncate that was refilled past our
# offset between two polls (a size check alone misses it; every event starts with a distinct ts).
_HEAD_BYTES = 4096
# A line longer than this is not a SiloTune event; dropping it keeps memory bounded.
MAX_LINE_BYTES = 1 << 20


class EventTail:
    """Follows one JSONL file across appends, truncation and rotation (rename + new file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: Any = None
        self._ino: tuple[int, int] | None = None
        self._partial = b""
        self._head = b""
        self.malformed = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._ino, self._partial, self._head = None, None, b"", b""

    def read_new(self) -> list[dict[str, Any]]:
        """Return the complete events appended since the last call (a partial line waits)."""
        events: list[dict[str, Any]] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fh is not None and (st is None or (st.st_dev, st.st_ino) != self._ino):
            # Rotated or removed: finish what the writer appended to the old file, then switch.
            events += self._drain()
            self.close()
        if st is None:
            return events
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115  (kept open between polls)
            except FileNotFoundError:
                return events
            fst = os.fstat(self._fh.fileno())
            self._ino = (fst.st_dev, fst.st_ino)
        elif self._truncated(st.st_size):
            # Truncated in place (copytruncate): start over; counters keep what they had.
            self._fh.seek(0)
            self._partial, self._head = b"", b""
        events += self._drain()
        self._remember_head()
        return events

    def _truncated(self, size: int) -> bool:
        """True when the file was cut in place, even if it has since grown past our offset."""
        if size < self._fh.tell():
            return True
        if not self._head:
            return False
        return os.pread(self._fh.fileno(), len(self._head), 0) != self._head

    def _remember_head(self) -> None:
        want = min(self._fh.tell(), _HEAD_BYTES)
        if len(self._head) < want:
            self._head = os.pread(self._fh.fileno(), want, 0)

    def _drain(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            chunk = self._fh.read(_CHUNK)
            if not chunk:
                return events
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            if len(self._partial) > MAX_LINE_BYTES:
                self.malformed += 1
                self._partial = b""
            for line in lines:
                event = self._parse(line)
                if event is not None:
                    events.append(event)

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.malformed += 1
            return None
        if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
            self.malformed += 1
            return None
        return event


# Gauge fields of silo_result / local_train events -> metric (exported only when present).
_SILO_GAUGES: dict[str, m.MetricDef] = {
    protocol.F_ROUND: m.SILO_LAST_ROUND,
    protocol.F_TRAIN_SECONDS: m.SILO_TRAIN_SECONDS,
    protocol.F_TOKENS_PER_SECOND: m.SILO_TOKENS_PER_SECOND,
    protocol.F_TRAIN_LOSS: m.SILO_TRAIN_LOSS,
    protocol.F_EXAMPLES: m.SILO_EXAMPLES_LAST,
    protocol.PEAK_GPU_ALLOCATED: m.SILO_GPU_ALLOCATED,
    protocol.PEAK_GPU_RESERVED: m.SILO_GPU_RESERVED,
    protocol.NVML_USED: m.SILO_NVML_USED,
    protocol.GPU_TOTAL: m.SILO_GPU_CAPACITY,
    protocol.PEAK_RSS: m.SILO_PEAK_RSS,
    protocol.F_LORA_RANK: m.SILO_LORA_RANK,
    protocol.THREADS: m.SILO_THREADS,  # the allotment (silo_node/app/allotment.py), from local_train events
    protocol.GPUS: m.SILO_GPUS,
    protocol.F_REPLY_SECONDS: m.SILO_REPLY_SECONDS,
    protocol.DP_EPSILON_SPENT: m.SILO_DP_EPSILON_SPENT,  # only silos with [privacy]
    protocol.DP_EPSILON_BUDGET: m.SILO_DP_EPSILON_BUDGET,
}
_GPU_FIELDS = frozenset(protocol.GPU_FIELDS)
# Server events that mean the run moved; their time is silotune_last_progress_timestamp_seconds,
# so a ServerApp that is killed or hangs stops moving it and SiloTuneNoProgress fires.
_PROGRESS_KINDS = frozenset(
    {protocol.EV_RUN_START, protocol.EV_ROUND_START, protocol.EV_SILO_REPLY, protocol.EV_SILO_RESULT,
     protocol.EV_SILO_FAILED, protocol.EV_UPDATE_REJECTED, protocol.EV_ROUND_END, protocol.EV_EVALUATION,
     # A silo waiting for its operator's approval is asked again every round: the run is waiting
     # on purpose, not stalled.
     protocol.EV_SILO_PENDING}
)  # fmt: skip
_SILO_COUNTERS: dict[str, m.MetricDef] = {
    protocol.F_UPLINK_BYTES: m.UPLINK_BYTES,
    protocol.F_DOWNLINK_BYTES: m.DOWNLINK_BYTES,
    protocol.F_UPLINK_FP32_BYTES: m.UPLINK_FP32_BYTES,
    protocol.F_DOWNLINK_FP32_BYTES: m.DOWNLINK_FP32_BYTES,
    protocol.F_EXAMPLES: m.SILO_EXAMPLES,
    protocol.TOKENS: m.SILO_TOKENS,
    protocol.F_TRAIN_SECONDS: m.SILO_TRAIN_SECONDS_TOTAL,
}


@dataclass
class FederationState:
    """What the exporter serves, built only from events (pure: unit-testable without HTTP)."""

    default_budget_bytes: float = m.FLOWERTUNE_BUDGET_MB * m.BYTES_PER_MB
    counters: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    gauges: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    node_silo: dict[str, str] = field(default_factory=dict)
    run_labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._set(m.COMM_BUDGET, self.default_budget_bytes)

    def _inc(self, d: m.MetricDef, amount: float, labels: tuple[str, ...] = ()) -> None:
        series = self.counters.setdefault(d.name, {})
        series[labels] = series.get(labels, 0.0) + max(amount, 0.0)

    def _set(self, d: m.MetricDef, value: float | None, labels: tuple[str, ...] = ()) -> None:
        if value is not None:
            self.gauges.setdefault(d.name, {})[labels] = value

    def _silo(self, event: dict[str, Any]) -> str:
        node = str(event.get(protocol.F_NODE_ID, ""))
        name = event.get("silo")
        if isinstance(name, str) and name:
            if node:
                self.node_silo[node] = name
            return name
        return self.node_silo.get(node, f"node-{node}" if node else "unknown")

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        self._inc(m.EVENTS_READ, 1, (kind,))
        ts = finite_number(event.get("ts"))
        if ts is not None:
            prev = self.gauges.get(m.LAST_EVENT_TS.name, {}).get((), 0.0)
            self._set(m.LAST_EVENT_TS, max(prev, ts))
            if kind in _PROGRESS_KINDS:
                prev = self.gauges.get(m.LAST_PROGRESS_TS.name, {}).get((), 0.0)
                self._set(m.LAST_PROGRESS_TS, max(prev, ts))
        self._set(m.PROGRESS_TIMEOUT, finite_number(event.get("progress_timeout_seconds")))
        handler = EVENT_HANDLERS.get(kind)
        if handler is not None:
            handler(self, event)

    def _on_run_start(self, e: dict[str, Any]) -> None:
        self._inc(m.RUNS_STARTED, 1)
        self._inc(m.ROUNDS_STALLED, 0)  # present from the start: the first stall is an increase
        for d in (m.ROUND, m.ROUNDS_COMPLETED, m.ROUND_IN_PROGRESS, m.COMM_BYTES):
            self._set(d, 0.0)
        self.gauges.pop(m.EVALUATION.name, None)
        self._set(m.RUN_ACTIVE, 1.0)
        self._set(m.ROUNDS_PLANNED, finite_number(e.get(protocol.F_NUM_ROUNDS)))
        self._set(m.ADAPTER_PARAMETERS, finite_number(e.get("adapter_parameters")))
        budget = finite_number(e.get("comm_budget_bytes"))
        self._set(m.COMM_BUDGET, self.default_budget_bytes if budget is None else budget)
        labels = tuple(str(e.get(k, "")) for k in ("run_id", "strategy", "peft_method"))
        self.gauges[m.RUN_INFO.name] = {labels: 1.0}

    def _on_round_start(self, e: dict[str, Any]) -> None:
        self._set(m.ROUND, finite_number(e.get(protocol.F_ROUND)))
        self._set(m.ROUND_IN_PROGRESS, 1.0)
        self._set(m.ROUND_STARTED_TS, finite_number(e.get("ts")))
        self._set(m.SILOS_CONNECTED, _count(e.get("connected")))
        self._set(m.SILOS_SAMPLED, _count(e.get(protocol.F_SAMPLED)))

    def _on_round_end(self, e: dict[str, Any]) -> None:
        self._set(m.ROUND, finite_number(e.get(protocol.F_ROUND)))
        self._set(m.ROUND_IN_PROGRESS, 0.0)
        self._set(m.ROUNDS_COMPLETED, finite_number(e.get(protocol.F_ROUND)))
        self._inc(m.ROUNDS_COMPLETED_TOTAL, 1)
        self._set(m.SILOS_SAMPLED, _count(e.get(protocol.F_SAMPLED)))
        self._set(m.SILOS_ANSWERED, _count(e.get(protocol.F_ANSWERED)))
        self._set(m.SILOS_FAILED, _count(e.get("failed")))
        self._set(m.ROUND_DURATION, finite_number(e.get("duration_seconds")))
        self._set(m.AGGREGATION_DURATION, finite_number(e.get("aggregation_seconds")))
        up, down = (
            finite_number(e.get(protocol.F_UPLINK_BYTES)),
            finite_number(e.get(protocol.F_DOWNLINK_BYTES)),
        )
        self._set(m.ROUND_UPLINK, up)
        self._set(m.ROUND_DOWNLINK, down)
        self._set(m.ROUND_TRAIN_LOSS, finite_number(e.get(protocol.F_TRAIN_LOSS)))
        # Central DP (central-dp.enabled): the run's epsilon so far, from this round's release.
        self._set(m.CENTRAL_DP_EPSILON, finite_number(e.get(protocol.CDP_EPSILON)))
        cumulative = finite_number(e.get("cumulative_bytes"))
        if cumulative is None:  # older writers: add this round's traffic ourselves
            prev = self.gauges.get(m.COMM_BYTES.name, {}).get((), 0.0)
            cumulative = prev + (up or 0.0) + (down or 0.0)
        self._set(m.COMM_BYTES, cumulative)

    def _on_round_stalled(self, e: dict[str, Any]) -> None:
        self._set(m.ROUND_IN_PROGRESS, 0.0)
        self._inc(m.ROUNDS_STALLED, 1)

    def _on_evaluation(self, e: dict[str, Any]) -> None:
        values = e.get("metrics")
        if not isinstance(values, dict):
            return
        self._set(m.EVALUATION_ROUND, finite_number(e.get(protocol.F_ROUND)))
        for name, value in values.items():
            self._set(m.EVALUATION, finite_number(value), (str(name),))

    def _on_run_end(self, e: dict[str, Any]) -> None:
        self._set(m.RUN_ACTIVE, 0.0)
        self._set(m.ROUND_IN_PROGRESS, 0.0)
        self._set(m.ROUNDS_COMPLETED, finite_number(e.get("rounds_completed")))

    def _on_silo_result(self, e: dict[str, Any]) -> None:
        labels = (self._silo(e),)
        if e["kind"] == protocol.EV_SILO_RESULT:
            # Start failure counters at 0 so the first failure is an increase alerts can see.
            self._inc(m.SILO_FAILURES, 0, labels)
            self._inc(m.UPDATES_REJECTED, 0, labels)
            self._inc(m.SILO_ROUNDS_LEARNED_NOTHING, 0, labels)
        self._inc(m.SILO_ROUNDS, 1, labels)
        self._set(m.SILO_LAST_RESULT_TS, finite_number(e.get("ts")), labels)
        for key, d in _SILO_COUNTERS.items():
            self._inc(d, finite_number(e.get(key)) or 0.0, labels)
        # The silo's meter writes 0 for every GPU figure when it has no GPU: not a measurement.
        no_gpu = finite_number(e.get(protocol.GPU_TOTAL)) == 0.0
        for key, d in _SILO_GAUGES.items():
            if not (no_gpu and key in _GPU_FIELDS):
                self._set(d, finite_number(e.get(key)), labels)

    def _on_silo_failed(self, e: dict[str, Any]) -> None:
        self._inc(m.SILO_FAILURES, 1, (self._silo(e),))
        if e.get("code") == SiloFailure.NO_LEARNING.name:
            self._inc(m.SILO_ROUNDS_LEARNED_NOTHING, 1, (self._silo(e),))

    def _on_update_rejected(self, e: dict[str, Any]) -> None:
        self._inc(m.UPDATES_REJECTED, 1, (self._silo(e),))
        # Older writers gave no code; their rejections count under "unspecified".
        reason = (self._silo(e), str(e.get("code") or "unspecified"), str(e.get("phase") or "train"))
        self._inc(m.UPDATES_REJECTED_BY_REASON, 1, reason)

    def _on_anomaly_score(self, e: dict[str, Any]) -> None:
        labels = (self._silo(e),)
        self._inc(m.SILO_EXCLUSIONS, 0, labels)  # start at 0: the first exclusion is an increase
        self._set(m.SILO_ANOMALY_DISTANCE, finite_number(e.get("distance")), labels)
        self._set(m.SILO_NORM_RATIO, finite_number(e.get("norm_ratio")), labels)
        self._set(m.SILO_UPDATE_COSINE, finite_number(e.get("cosine")), labels)
        self._set(m.SILO_ANOMALY_FLAGGED, 1.0 if e.get("flagged") is True else 0.0, labels)
        self._set(m.SILO_ANOMALY_STREAK, finite_number(e.get("streak")), labels)
        self._set(m.SILO_WEIGHT_SHARE, finite_number(e.get("weight_share")), labels)
        self._set(m.SILO_CLIP_FACTOR, finite_number(e.get("clip_factor")), labels)

    def _on_silo_excluded(self, e: dict[str, Any]) -> None:
        self._inc(m.SILO_EXCLUSIONS, 1, (self._silo(e),))

    def _on_quorum_missed(self, e: dict[str, Any]) -> None:
        self._inc(m.QUORUM_MISSED, 1)


# The event kinds the exporter counts, by their protocol names: one table to read, not handler
# names built from strings (tests/test_protocol.py checks every key is a kind the protocol names).
EVENT_HANDLERS: dict[str, Callable[[FederationState, dict[str, Any]], None]] = {
    protocol.EV_RUN_START: FederationState._on_run_start,
    protocol.EV_ROUND_START: FederationState._on_round_start,
    protocol.EV_ROUND_END: FederationState._on_round_end,
    protocol.EV_ROUND_STALLED: FederationState._on_round_stalled,
    protocol.EV_EVALUATION: FederationState._on_evaluation,
    protocol.EV_RUN_END: FederationState._on_run_end,
    protocol.EV_SILO_RESULT: FederationState._on_silo_result,
    protocol.EV_LOCAL_TRAIN: FederationState._on_silo_result,  # the silo's own record of its round
    protocol.EV_SILO_FAILED: FederationState._on_silo_failed,
    protocol.EV_UPDATE_REJECTED: FederationState._on_update_rejected,
    protocol.EV_ANOMALY: FederationState._on_anomaly_score,
    protocol.EV_SILO_EXCLUDED: FederationState._on_silo_excluded,
    protocol.EV_QUORUM_MISSED: FederationState._on_quorum_missed,
}


def _count(value: Any) -> float | None:
    """Events give silo sets either as a list of node ids or as a number."""
    if isinstance(value, list | tuple):
        return float(len(value))
    return finite_number(value)


class SiloTuneCollector(Collector):
    """Renders a FederationState at scrape time, after pulling new events from the tails."""

    def __init__(
        self,
        state: FederationState,
        tails: Iterable[EventTail],
        role: str,
        extra: Callable[[], Iterator[Metric]] | None = None,
    ) -> None:
        self.state, self.tails, self.role, self.extra = state, list(tails), role, extra
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            for tail in self.tails:
                for event in tail.read_new():
                    self.state.apply(event)

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        with self.lock:
            yield from render(self.state, self.role, sum(t.malformed for t in self.tails))
        if self.extra is not None:
            yield from self.extra()


def render(state: FederationState, role: str, malformed: int = 0) -> Iterator[Metric]:
    """Metric families for every series the state holds, in the definitions' order."""
    info = GaugeMetricFamily(m.EXPORTER_INFO.name, m.EXPORTER_INFO.help, labels=["role"])
    info.add_metric([role], 1.0)
    yield info
    bad = CounterMetricFamily(m.MALFORMED_LINES.name, m.MALFORMED_LINES.help)
    bad.add_metric([], float(malformed))
    yield bad
    for d in m.ALL:
        store = state.counters if d.kind == "counter" else state.gauges
        series = store.get(d.name)
        if not series:
            continue
        cls = CounterMetricFamily if d.kind == "counter" else GaugeMetricFamily
        family = cls(d.name, d.help, labels=list(d.labels))
        for labels, value in sorted(series.items()):
            family.add_metric(list(labels), value)
        yield family


def build_registry(
    events_file: Path,
    role: str,
    budget_bytes: float,
    extra: Callable[[], Iterator[Metric]] | None = None,
) -> tuple[CollectorRegistry, SiloTuneCollector]:
    """A registry with only SiloTune series; the log is read once before the first scrape."""
    collector = SiloTuneCollector(
        FederationState(default_budget_bytes=budget_bytes), [EventTail(events_file)], role, extra
    )
    collector.refresh()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry, collector
