"""The one home of the round protocol's names: message keys, reason codes, event kinds.

The server (superlink/app/rounds.py, superlink/app/reply_checks.py) and the silo (silo_node/app/client_app.py)
must spell every key the same way; a typo on one side would be a silent ``KeyError`` on the other,
so both import them from here. Reason codes are the stable, machine-readable half of every
``update_rejected`` event (the ``detail`` beside them is for people) and a Prometheus label.
"""

from __future__ import annotations

# --- records inside a message's RecordDict ---------------------------------------------------
REC_CONFIG = "config"  # ConfigRecord, server -> silo
REC_ARRAYS = "arrays"  # ArrayRecord, the adapter tensors (both ways)
REC_METRICS = "metrics"  # MetricRecord, silo -> server
REC_INFO = "info"  # ConfigRecord, silo -> server (identity, strings)

# --- config keys (server -> silo) ---------------------------------------------------------------
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
LR = "lr"
WANT_INIT = "want-init"
# SHA-256 of the agreed initial adapter (silotune.adapters.state_digest), sent with every round's
# payload while the global adapter still is that start: each silo checks it against its own.
INITIAL_SHA256 = "initial-sha256"
MODEL_NAME = "model-name"
MODEL_SHA256 = "model-sha256"
PROXIMAL_MU = "proximal-mu"

# --- info keys (silo -> server) -----------------------------------------------------------------
SILO = "silo"
DOMAIN = "domain"
PEFT_CONFIG = "peft-config"

# --- metric keys (silo -> server) ---------------------------------------------------------------
LORA_RANK = "lora-rank"
NUM_EXAMPLES = "num-examples"
NUM_EVAL_EXAMPLES = "num-eval-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
TOKENS = "tokens"
TOKENS_PER_SECOND = "tokens-per-second"
TRAIN_SECONDS = "train-seconds"
# The silo's allotment (silo_node/app/allotment.py): one spelling in the reply, its event and the exporter.
THREADS = "threads"
GPUS = "gpus"

# --- reason codes of update_rejected (and silo_failed at the handshake) --------------------------
R_MISSING_RECORD = "missing_record"  # no arrays / metrics / info record, or the wrong record type
R_MISSING_KEY = "missing_key"  # a required metric or info key is absent
R_WRONG_TYPE = "wrong_type"  # a value of the wrong type (a string where a number belongs, a bool)
R_NOT_FINITE = "not_finite"  # NaN or +-Inf in a metric
R_OUT_OF_RANGE = "out_of_range"  # a number outside its allowed range (e.g. -0 or negative examples)
R_EXAMPLES_GREW = "examples_grew"  # more training examples than declared at the handshake
R_RANK = "rank_out_of_bounds"  # a LoRA rank outside [1, peft.max-rank] or not the handshake's
R_MODEL = "model_mismatch"  # trained on another base model than the federation's
R_TENSOR_SET = "tensor_set"  # extra or missing tensors
R_SHAPE = "shape"  # a tensor's shape differs from what the strategy sent
R_DTYPE = "dtype"  # a tensor is not float32
R_OVERSIZED = "oversized"  # a tensor or the whole reply has more bytes than it should
R_TENSOR_VALUES = "tensor_not_finite"  # NaN or Inf inside a tensor
R_MALFORMED = "malformed"  # a tensor that cannot be decoded
R_ANOMALY_EXCLUDED = "anomaly_excluded"  # flagged as anomalous in K consecutive rounds
R_ENCODING = "encoding"  # tensors not in the run's transport.dtype, or a packed payload that is off
R_INIT_MISMATCH = "init_mismatch"  # an initial adapter that the other silos did not derive alike

REASON_CODES = (
    R_MISSING_RECORD,
    R_MISSING_KEY,
    R_WRONG_TYPE,
    R_NOT_FINITE,
    R_OUT_OF_RANGE,
    R_EXAMPLES_GREW,
    R_RANK,
    R_MODEL,
    R_TENSOR_SET,
    R_SHAPE,
    R_DTYPE,
    R_OVERSIZED,
    R_TENSOR_VALUES,
    R_MALFORMED,
    R_ANOMALY_EXCLUDED,
    R_ENCODING,
    R_INIT_MISMATCH,
)

# --- event kinds (silotune/events.py documents every kind and its fields) ------------------------
EV_RUN_START = "run_start"
EV_ROUND_START = "round_start"
EV_SILO_REPLY = "silo_reply"
EV_SILO_RESULT = "silo_result"
EV_SILO_FAILED = "silo_failed"
EV_SILO_PENDING = "silo_pending"
EV_SILO_HANDSHAKE = "silo_handshake"
EV_UPDATE_REJECTED = "update_rejected"
EV_EVAL_REJECTED = "evaluation_rejected"
EV_ANOMALY = "anomaly_score"
EV_SILO_EXCLUDED = "silo_excluded"
EV_QUORUM_MISSED = "quorum_missed"
EV_ROUND_END = "round_end"
EV_EVALUATION = "evaluation"
EV_ROUND_STALLED = "round_stalled"
EV_RUN_END = "run_end"
EV_LOCAL_TRAIN = "local_train"  # the silo's own record of a round (its events file)
EVENT_KINDS: tuple[str, ...] = (
    EV_RUN_START, EV_ROUND_START, EV_SILO_REPLY, EV_SILO_RESULT, EV_SILO_FAILED, EV_SILO_PENDING,
    EV_SILO_HANDSHAKE, EV_UPDATE_REJECTED, EV_EVAL_REJECTED, EV_ANOMALY, EV_SILO_EXCLUDED,
    EV_QUORUM_MISSED, EV_ROUND_END, EV_EVALUATION, EV_ROUND_STALLED, EV_RUN_END, EV_LOCAL_TRAIN,
)  # fmt: skip

# --- event fields that readers look up by name (the exporter, the HTML report, `silotune run`) --------
# The round_end event and the SILOTUNE-ROUND line carry the same summary under the same names; each
# silo_result row is written under these keys and read back under them (monitoring/, demo/).
F_ROUND = "round"
F_NUM_ROUNDS = "num_rounds"
F_NODE_ID = "node_id"
F_SAMPLED = "sampled"
F_ANSWERED = "answered"
F_CHECKPOINT = "checkpoint"
F_UPLINK_BYTES = "uplink_bytes"
F_DOWNLINK_BYTES = "downlink_bytes"
F_UPLINK_FP32_BYTES = "uplink_fp32_bytes"
F_DOWNLINK_FP32_BYTES = "downlink_fp32_bytes"
F_TRAIN_LOSS = "train_loss"
F_EXAMPLES = "examples"
F_TOKENS_PER_SECOND = "tokens_per_second"
F_TRAIN_SECONDS = "train_seconds"
F_LORA_RANK = "lora_rank"
F_REPLY_SECONDS = "reply_seconds"
# What the SILOTUNE-ROUND line holds (superlink/ops/submit.py reads it): round_end's summary.
PROGRESS_FIELDS: tuple[str, ...] = (
    F_ROUND, F_NUM_ROUNDS, F_SAMPLED, F_ANSWERED, F_TRAIN_LOSS, F_UPLINK_BYTES, F_DOWNLINK_BYTES,
    F_CHECKPOINT,
)  # fmt: skip

# --- run_end statuses -------------------------------------------------------------------------------
RUN_COMPLETED = "completed"  # every round ran
RUN_BUDGET_EXCEEDED = "budget_exceeded"  # comm-budget-mb reached
RUN_STALLED = "stalled"  # rounds in a row made no progress (superlink/app/watchdog.py)
RUN_FAILED = "failed"  # an error ended the ServerApp
RUN_STOPPED = "stopped"  # interrupted (flwr stop, a signal)
# central-dp.max-epsilon reached: the next round's release would have passed it (central DP)
RUN_DP_BUDGET_EXHAUSTED = "dp_budget_exhausted"
RUN_STATUSES = (
    RUN_COMPLETED, RUN_BUDGET_EXCEEDED, RUN_STALLED, RUN_FAILED, RUN_STOPPED, RUN_DP_BUDGET_EXHAUSTED,
)  # fmt: skip
# The statuses that end a run for good: a failed or stopped run may be resumed (run journal).
CLOSING_STATUSES = (RUN_COMPLETED, RUN_BUDGET_EXCEEDED, RUN_STALLED, RUN_DP_BUDGET_EXHAUSTED)

# --- the ServerApp's log lines that `silotune run` (superlink/ops/submit.py) follows ------------------
# `flwr run --stream` relays the ServerApp's log from wherever the SuperLink runs, so progress
# crosses machines without an extra port: one PROGRESS line per round, DONE or FAILED at the end.
PROGRESS_PREFIX = "SILOTUNE-ROUND "
DONE_PREFIX = "SILOTUNE-DONE "
FAILED_MARK = "SiloTune run failed"

# --- one silo's memory figures, as every record spells them ---------------------------------------
# The silo's meter (silo_node/app/memory.py) fills these; its train reply carries them as MetricRecord
# keys (hyphenated, Flower's style), its local_train event and the server's silo_result event as
# snake_case fields; the exporter and the HTML report read the same names. A GPU-less silo reports
# 0 for every GPU figure, which readers treat as "no GPU", not as a measurement.
PEAK_GPU_ALLOCATED = "peak_gpu_allocated_bytes"  # torch.cuda.max_memory_allocated
PEAK_GPU_RESERVED = "peak_gpu_reserved_bytes"  # torch.cuda.max_memory_reserved
NVML_USED = "nvml_used_bytes"  # device memory in use per NVML
GPU_TOTAL = "gpu_total_bytes"  # the GPU's capacity
PEAK_RSS = "peak_rss_bytes"  # peak resident memory of the training process
GPU_USAGE_FIELDS: tuple[str, ...] = (PEAK_GPU_ALLOCATED, PEAK_GPU_RESERVED, NVML_USED)
GPU_FIELDS: tuple[str, ...] = (*GPU_USAGE_FIELDS, GPU_TOTAL)
MEMORY_FIELDS: tuple[str, ...] = (*GPU_FIELDS, PEAK_RSS)

# --- one silo's differential-privacy figures (silo_node/app/privacy.py; docs/privacy.md) ---------------
# Present only when the silo's policy has [privacy]: its train reply carries them as MetricRecord
# keys (metric_key), its local_train event and the server's silo_result event as these fields.
DP_EPSILON_SPENT = "dp_epsilon_spent"  # epsilon spent on the silo's dataset, all runs, this round included
DP_EPSILON_BUDGET = "dp_epsilon_budget"  # the silo's budget for that dataset (its policy's epsilon-budget)
DP_EPSILON_RUN = "dp_epsilon_run"  # epsilon of this run's rounds alone
DP_NOISE_MULTIPLIER = "dp_noise_multiplier"  # sigma of the round's Gaussian noise, in clipping norms
DP_DELTA = "dp_delta"
DP_FIELDS: tuple[str, ...] = (
    DP_EPSILON_SPENT, DP_EPSILON_BUDGET, DP_EPSILON_RUN, DP_NOISE_MULTIPLIER, DP_DELTA,
)  # fmt: skip

# --- central DP on the aggregate (superlink/app/defences/central_dp.py; docs/privacy.md) ---------------
# The central mechanism's figures of one round (central-dp.enabled): the report of
# central_dp_aggregate carries them under these names, for the round's events.
CDP_NOISE_MULTIPLIER = "central_dp_noise_multiplier"  # z of the round's release
CDP_CLIPPING_NORM = "central_dp_clipping_norm"  # C, the bound on one silo's whole adapter delta
CDP_NOISE_STD = "central_dp_noise_std"  # z x C / num_sampled, per coordinate of the mean delta
CDP_NUM_SAMPLED = "central_dp_num_sampled"  # the mean's fixed denominator: silos the round asked
CDP_NUM_UPDATES = "central_dp_num_updates"  # clipped updates summed (answered and valid)
CDP_NUM_CLIPPED = "central_dp_num_clipped"  # of those, how many were over C
CDP_SAMPLE_RATE = "central_dp_sample_rate"  # q the accountant charged (1: no amplification)
CDP_EPSILON = "central_dp_epsilon"  # the run's central epsilon, this round's release included
CDP_DELTA = "central_dp_delta"  # the delta that epsilon is at (central-dp.target-delta)
CDP_FIELDS: tuple[str, ...] = (
    CDP_NOISE_MULTIPLIER, CDP_CLIPPING_NORM, CDP_NOISE_STD, CDP_NUM_SAMPLED, CDP_NUM_UPDATES,
    CDP_NUM_CLIPPED, CDP_SAMPLE_RATE, CDP_EPSILON, CDP_DELTA,
)  # fmt: skip
# Per silo, in the order of the updates passed in (the central site's own view, not noised:
# never publish them beside the adapter).
CDP_UPDATE_NORM = "central_dp_update_norm"  # L2 norm of the silo's delta before clipping
CDP_CLIP_FACTOR = "central_dp_clip_factor"  # min(1, C / norm)
CDP_SILO_FIELDS: tuple[str, ...] = (CDP_UPDATE_NORM, CDP_CLIP_FACTOR)
# The checkpoint manifest's key for the central accountant's state (CentralAccountant.to_dict).
CDP_MANIFEST_KEY = "central_dp_accountant"


def metric_key(field: str) -> str:
    """The MetricRecord key of an event field: ``peak_rss_bytes`` -> ``peak-rss-bytes``."""
    return field.replace("_", "-")
