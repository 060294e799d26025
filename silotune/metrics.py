"""Every Prometheus series SiloTune exposes: name, type, help and labels, in one place.

The exporter, the alert rules, the Grafana dashboards and the tests all refer to these names; a
test checks that the dashboards and rules use no silotune_* name that is not defined here.

Conventions (https://prometheus.io/docs/practices/naming/): names carry their unit, counters end
in ``_total``, labels have low cardinality. The only per-entity label is ``silo`` (one value per
institution); the round number is a gauge value, never a label, so series do not multiply per round.
Evaluation metrics carry a ``metric`` label whose values are the few evaluation names a run reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NAMESPACE = "silotune"
# FlowerTune counts megabytes as 1024**2 bytes (size / 1024**2 in its communication tracker).
BYTES_PER_MB = 1024**2
FLOWERTUNE_BUDGET_MB = 200_000.0


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Literal["counter", "gauge"]
    help: str
    labels: tuple[str, ...] = ()


_S = ("silo",)

# --- per silo (from the server's silo_result events, or the silo's own local_train events) ---
UPLINK_BYTES = MetricDef(
    "silotune_uplink_bytes_total", "counter", "Adapter payload bytes sent silo -> server.", _S
)
DOWNLINK_BYTES = MetricDef(
    "silotune_downlink_bytes_total", "counter", "Adapter payload bytes sent server -> silo.", _S
)
UPLINK_FP32_BYTES = MetricDef(
    "silotune_uplink_fp32_bytes_total",
    "counter",
    "The uplink's adapters as float32 (what transport.dtype=fp32 would have sent).",
    _S,
)
DOWNLINK_FP32_BYTES = MetricDef(
    "silotune_downlink_fp32_bytes_total",
    "counter",
    "The downlink's adapters as float32 (what transport.dtype=fp32 would have sent).",
    _S,
)
SILO_ROUNDS = MetricDef(
    "silotune_silo_rounds_total", "counter", "Local training rounds a silo completed.", _S
)
SILO_EXAMPLES = MetricDef(
    "silotune_silo_examples_total", "counter", "Training examples a silo processed.", _S
)
SILO_TOKENS = MetricDef("silotune_silo_tokens_total", "counter", "Training tokens a silo processed.", _S)
SILO_TRAIN_SECONDS_TOTAL = MetricDef(
    "silotune_silo_train_seconds_total", "counter", "Seconds a silo spent in local training.", _S
)
SILO_LAST_ROUND = MetricDef(
    "silotune_silo_last_round", "gauge", "Round of the silo's most recent result.", _S
)
SILO_LAST_RESULT_TS = MetricDef(
    "silotune_silo_last_result_timestamp_seconds", "gauge", "Unix time of the last result.", _S
)
SILO_TRAIN_SECONDS = MetricDef(
    "silotune_silo_train_seconds", "gauge", "Local training seconds in the last round.", _S
)
SILO_TOKENS_PER_SECOND = MetricDef(
    "silotune_silo_tokens_per_second", "gauge", "Training throughput in the last round.", _S
)
SILO_TRAIN_LOSS = MetricDef(
    "silotune_silo_train_loss", "gauge", "Mean local training loss in the last round.", _S
)
SILO_EXAMPLES_LAST = MetricDef("silotune_silo_examples", "gauge", "Training examples in the last round.", _S)
SILO_GPU_ALLOCATED = MetricDef(
    "silotune_silo_gpu_peak_allocated_bytes",
    "gauge",
    "torch.cuda.max_memory_allocated during the last round (reset every round).",
    _S,
)
SILO_GPU_RESERVED = MetricDef(
    "silotune_silo_gpu_peak_reserved_bytes",
    "gauge",
    "torch.cuda.max_memory_reserved during the last round (reset every round).",
    _S,
)
SILO_NVML_USED = MetricDef(
    "silotune_silo_nvml_used_bytes", "gauge", "GPU memory in use per NVML at round end.", _S
)
SILO_GPU_CAPACITY = MetricDef(
    "silotune_silo_gpu_capacity_bytes", "gauge", "Total memory of the silo's GPU.", _S
)
SILO_PEAK_RSS = MetricDef(
    "silotune_silo_peak_rss_bytes", "gauge", "Peak resident memory of the training process.", _S
)
SILO_LORA_RANK = MetricDef(
    "silotune_silo_lora_rank", "gauge", "Adapter rank the silo trained in the last round.", _S
)
SILO_THREADS = MetricDef(
    "silotune_silo_threads", "gauge", "CPU threads the silo's training was allotted.", _S
)
SILO_GPUS = MetricDef("silotune_silo_gpus", "gauge", "GPUs the silo's training was allotted.", _S)
SILO_DP_EPSILON_SPENT = MetricDef(
    "silotune_silo_dp_epsilon_spent",
    "gauge",
    "Differential-privacy epsilon the silo has spent on its dataset, all runs (silo_node/app/privacy.py).",
    _S,
)
SILO_DP_EPSILON_BUDGET = MetricDef(
    "silotune_silo_dp_epsilon_budget",
    "gauge",
    "The silo's own epsilon budget for its dataset (its policy's [privacy] epsilon-budget).",
    _S,
)
SILO_REPLY_SECONDS = MetricDef(
    "silotune_silo_reply_seconds",
    "gauge",
    "Seconds from sending the silo its training message to its reply, last round.",
    _S,
)
SILO_FAILURES = MetricDef(
    "silotune_silo_failures_total", "counter", "Rounds in which a sampled silo failed.", _S
)
UPDATES_REJECTED = MetricDef(
    "silotune_updates_rejected_total", "counter", "Silo updates refused by validation.", _S
)
SILO_ROUNDS_LEARNED_NOTHING = MetricDef(
    "silotune_silo_rounds_learned_nothing_total",
    "counter",
    "Rounds a silo refused to send back because training changed nothing (code NO_LEARNING).",
    _S,
)

# --- federation (server only) ---
RUN_INFO = MetricDef(
    "silotune_run_info",
    "gauge",
    "Current run (value 1); labels describe it.",
    ("run_id", "strategy", "peft_method"),
)
RUN_ACTIVE = MetricDef("silotune_run_active", "gauge", "1 while a run is in progress, else 0.")
RUNS_STARTED = MetricDef("silotune_runs_started_total", "counter", "Runs started.")
ADAPTER_PARAMETERS = MetricDef(
    "silotune_adapter_parameters", "gauge", "Trainable adapter parameters of the current run."
)
ROUNDS_PLANNED = MetricDef("silotune_rounds_planned", "gauge", "Rounds the current run plans.")
ROUND = MetricDef("silotune_round", "gauge", "Current (or last) round number of the current run.")
ROUND_IN_PROGRESS = MetricDef(
    "silotune_round_in_progress", "gauge", "1 between a round's start and its end, else 0."
)
ROUND_STARTED_TS = MetricDef(
    "silotune_round_start_timestamp_seconds", "gauge", "Unix time the current round started."
)
ROUNDS_COMPLETED = MetricDef("silotune_rounds_completed", "gauge", "Rounds completed in the current run.")
ROUNDS_COMPLETED_TOTAL = MetricDef(
    "silotune_rounds_completed_total", "counter", "Rounds completed over all runs."
)
ROUNDS_STALLED = MetricDef(
    "silotune_rounds_stalled_total", "counter", "Rounds the watchdog failed for making no progress."
)
LAST_PROGRESS_TS = MetricDef(
    "silotune_last_progress_timestamp_seconds",
    "gauge",
    "Unix time of the run's last progress event (round start or end, a silo's reply, a result).",
)
PROGRESS_TIMEOUT = MetricDef(
    "silotune_progress_timeout_seconds",
    "gauge",
    "Seconds the run may go without progress before it counts as stalled (from the watchdog).",
)
SILOS_CONNECTED = MetricDef(
    "silotune_silos_connected", "gauge", "Silos connected at the start of the last round."
)
SILOS_SAMPLED = MetricDef("silotune_silos_sampled", "gauge", "Silos sampled in the last round.")
SILOS_ANSWERED = MetricDef(
    "silotune_silos_answered", "gauge", "Sampled silos that answered in the last round."
)
SILOS_FAILED = MetricDef(
    "silotune_silos_failed", "gauge", "Sampled silos that failed in the last completed round."
)
ROUND_DURATION = MetricDef(
    "silotune_round_duration_seconds", "gauge", "Wall time of the last completed round."
)
AGGREGATION_DURATION = MetricDef(
    "silotune_aggregation_duration_seconds", "gauge", "Aggregation time of the last round."
)
ROUND_UPLINK = MetricDef(
    "silotune_round_uplink_bytes", "gauge", "Adapter payload bytes received in the last round."
)
ROUND_DOWNLINK = MetricDef(
    "silotune_round_downlink_bytes", "gauge", "Adapter payload bytes sent in the last round."
)
ROUND_TRAIN_LOSS = MetricDef(
    "silotune_train_loss", "gauge", "Aggregated training loss of the last completed round."
)
COMM_BYTES = MetricDef(
    "silotune_comm_bytes",
    "gauge",
    "Adapter payload bytes (up + down) so far in the current run, as counted against the budget.",
)
COMM_BUDGET = MetricDef(
    "silotune_comm_budget_bytes", "gauge", "Communication budget of the run (0 = unlimited)."
)
EVALUATION = MetricDef("silotune_evaluation_value", "gauge", "Latest global evaluation metric.", ("metric",))
EVALUATION_ROUND = MetricDef("silotune_evaluation_round", "gauge", "Round of the latest global evaluation.")

# --- defences against a faulty or malicious silo (server only; superlink/app/defences/) ---
UPDATES_REJECTED_BY_REASON = MetricDef(
    "silotune_updates_rejected_by_reason_total",
    "counter",
    "Silo replies refused by validation, by reason code (silotune/protocol.py) and phase.",
    ("silo", "reason", "phase"),
)
SILO_ANOMALY_DISTANCE = MetricDef(
    "silotune_silo_anomaly_distance",
    "gauge",
    "Lower-median distance of the silo's last update from the others', in the round's median norms.",
    _S,
)
SILO_NORM_RATIO = MetricDef(
    "silotune_silo_update_norm_ratio",
    "gauge",
    "Norm of the silo's last update over the median norm of the others' updates.",
    _S,
)
SILO_UPDATE_COSINE = MetricDef(
    "silotune_silo_update_cosine",
    "gauge",
    "Cosine of the silo's last update with the others' summed update (flagged below anomaly-min-cosine).",
    _S,
)
SILO_ANOMALY_FLAGGED = MetricDef(
    "silotune_silo_anomaly_flagged", "gauge", "1 if the silo's last update was flagged as anomalous.", _S
)
SILO_ANOMALY_STREAK = MetricDef(
    "silotune_silo_anomaly_streak", "gauge", "Consecutive rounds the silo's update was flagged.", _S
)
SILO_WEIGHT_SHARE = MetricDef(
    "silotune_silo_weight_share", "gauge", "The silo's capped share of the last round's weight.", _S
)
SILO_CLIP_FACTOR = MetricDef(
    "silotune_silo_clip_factor",
    "gauge",
    "Smallest factor the silo's last update was clipped by over its modules (1: not clipped).",
    _S,
)
SILO_EXCLUSIONS = MetricDef(
    "silotune_silo_exclusions_total",
    "counter",
    "Times a silo was excluded from a run for anomalous updates in consecutive rounds.",
    _S,
)
CENTRAL_DP_EPSILON = MetricDef(
    "silotune_central_dp_epsilon",
    "gauge",
    "Epsilon the run's central DP has spent (central-dp.enabled; superlink/app/defences/central_dp.py).",
)
QUORUM_MISSED = MetricDef(
    "silotune_rounds_quorum_missed_total",
    "counter",
    "Rounds with fewer valid updates than strategy.min-answers (global adapter unchanged).",
)

# --- Flower's own traffic accounting (central exporter, optional `flwr ls` poller) ---
WIRE_IN = MetricDef(
    "silotune_flower_traffic_inbound_bytes_total",
    "counter",
    "Bytes into the SuperLink per Flower's accounting (`flwr ls`), summed over listed runs.",
)
WIRE_OUT = MetricDef(
    "silotune_flower_traffic_outbound_bytes_total",
    "counter",
    "Bytes out of the SuperLink per Flower's accounting (`flwr ls`), summed over listed runs.",
)
WIRE_RUN_IN = MetricDef(
    "silotune_flower_run_traffic_inbound_bytes",
    "gauge",
    "Bytes into the SuperLink for the newest run per `flwr ls`.",
)
WIRE_RUN_OUT = MetricDef(
    "silotune_flower_run_traffic_outbound_bytes",
    "gauge",
    "Bytes out of the SuperLink for the newest run per `flwr ls`.",
)
WIRE_POLL_OK = MetricDef(
    "silotune_flower_poll_success", "gauge", "1 if the last `flwr ls` poll succeeded, else 0."
)

# --- the exporter itself ---
EXPORTER_INFO = MetricDef("silotune_exporter_info", "gauge", "Exporter role (value 1).", ("role",))
EVENTS_READ = MetricDef("silotune_exporter_events_total", "counter", "Events read, by kind.", ("kind",))
MALFORMED_LINES = MetricDef(
    "silotune_exporter_malformed_lines_total", "counter", "Event lines that were not valid JSON."
)
LAST_EVENT_TS = MetricDef(
    "silotune_exporter_last_event_timestamp_seconds", "gauge", "Timestamp of the newest event."
)

ALL: tuple[MetricDef, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricDef))
BY_NAME: dict[str, MetricDef] = {m.name: m for m in ALL}
