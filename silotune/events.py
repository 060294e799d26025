"""Append-only JSON-lines event log: the hand-off from short-lived Flower app processes.

ServerApp and ClientApp run in child processes that live for one run (or one message), so they
cannot serve metrics themselves. They append one JSON object per event to a file; long-lived
exporters (monitoring.exporter) and the run report read those files. Appends of one line below
PIPE_BUF are atomic on POSIX, so concurrent writers never interleave within a line, and a reader
that sees a partial last line simply skips it until it is complete.

Where events go:
- the server always writes ``<run-dir>/events.jsonl`` (the run's own record);
- both roles also write ``$SILOTUNE_EVENTS_DIR/<role>.jsonl`` when that variable is set, which is
  what ``silotune superlink start`` / ``silotune silo start`` do for the exporters.

Event kinds and fields (all carry ``ts`` (unix seconds), ``kind`` and ``role``):
  run_start      run_id, num_rounds, strategy, peft_method, comm_budget_bytes, base_model,
                 progress_timeout_seconds (the longest silence a healthy run has)
  round_start    round, connected, sampled (list of node ids), progress_timeout_seconds
  silo_reply     round, node_id, phase (query/train/evaluate), reply_seconds: one per pulled reply
  silo_result    round, node_id, silo, uplink_bytes, downlink_bytes, train_loss, examples, tokens,
                 tokens_per_second, train_seconds, peak_gpu_allocated_bytes,
                 peak_gpu_reserved_bytes, nvml_used_bytes, peak_rss_bytes, lora_rank,
                 reply_seconds (push to reply); a silo with [privacy]: dp_epsilon_spent,
                 dp_epsilon_budget, dp_epsilon_run, dp_noise_multiplier, dp_delta (docs/privacy.md)
  silo_failed    round, node_id, reason (handshake failures: retry_round, when it is asked again)
  silo_pending   round, node_id, silo, code (APPROVAL_PENDING), reason: the run waits for that
                 silo operator's approval; not a failure, asked again every round
  silo_handshake node_id, silo (the name it was admitted under, else node-<id>), claimed_name (only
                 when the silo calls itself something else), rank, num_examples
  update_rejected round, node_id, silo, phase (handshake|init|train|evaluate), code (a reason code
                 of silotune/protocol.py), reason (detail for people)
  anomaly_score  round, node_id, silo, norm, norm_ratio, distance, cosine, flagged, streak, weight_share,
                 clip_factor, modules_used, aggregator (superlink/app/defences/)
  silo_excluded  round, node_id, silo, code, reason (flagged in strategy.anomaly-rounds rounds)
  quorum_missed  round, valid_updates, min_answers (the global adapter stayed unchanged)
  round_end      round, duration_seconds, aggregation_seconds, sampled, answered, failed,
                 uplink_bytes, downlink_bytes, cumulative_bytes, train_loss, checkpoint,
                 quorum_met, adapter_updated; under central DP also protocol.CDP_FIELDS
                 (central_dp_noise_std, central_dp_epsilon, ...)
  evaluation     round, metrics (dict name -> value)
  round_stalled  round, reason: the watchdog failed the round (no progress); no round_end follows
  run_end        status ("completed" | "budget_exceeded" | "stalled" | "failed" | "stopped" |
                 "dp_budget_exhausted": central-dp.max-epsilon reached),
                 rounds_completed (the last round that produced a new adapter, whatever the
                 status), adapter_dir, reason (when not completed normally)
  local_train    (silo side) round, silo, train_loss, examples, tokens, tokens_per_second,
                 train_seconds, peak_* as above, uplink_bytes, downlink_bytes, threads and gpus
                 (the allotment), worker_model_loads (base-model loads by this process: 1 across
                 rounds in a resident worker), worker_rss_bytes (RSS after the round)
                 and the dp_* fields of silo_result when the silo's policy has [privacy]
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVENTS_DIR_ENV = "SILOTUNE_EVENTS_DIR"


class EventLog:
    """Writes events to every configured JSONL file; never raises on I/O (metrics are best effort)."""

    def __init__(self, role: str, paths: list[Path] | None = None) -> None:
        self.role = role
        self.paths = list(paths or [])
        env_dir = os.environ.get(EVENTS_DIR_ENV)
        if env_dir:
            self.paths.append(Path(env_dir) / f"{role}.jsonl")

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"ts": time.time(), "kind": kind, "role": self.role, **fields}
        line = json.dumps(event, default=_jsonable, separators=(",", ":")) + "\n"
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # O_APPEND single write: atomic for lines below PIPE_BUF on local filesystems.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode("utf-8"))
                finally:
                    os.close(fd)
            except OSError:
                pass
        return event


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Yield complete events from a JSONL file, skipping a partial trailing line."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        return


# One rule for every reader of event files (exporter, report): a number is finite, never a bool.
def finite_number(value: Any) -> float | None:
    """A finite number from an event field, or None (missing, null, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None
