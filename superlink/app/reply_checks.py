"""Every field of every silo reply is checked here, before the round loop uses any of it.

One place for handshake, initial-adapter, train and evaluation replies. A reply that fails a check
raises ``ReplyRejected(code, detail)``: ``code`` is one of silotune.protocol's reason codes (stable;
an event field and a Prometheus label), ``detail`` says what was wrong for people. The round loop
turns it into an ``update_rejected`` event for that silo and that round; it never ends the run.

Nothing from a reply is trusted: record types, key presence, value types (a bool or a string is not
a number), finiteness and ranges of every number, and for tensors their names, count, dtype, shape
and byte size against what the strategy sent, checked on the wire metadata *before* any tensor is
decoded, so an oversized reply costs no memory beyond what Flower already received.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from silotune import protocol as p
from silotune.wire_codec import (
    META_KEY,
    CodecError,
    Encoding,
    decode,
    decode_uplink,
    packed_sizes,
    payload_shapes,
)

# A silo declaring more examples than this is lying or misconfigured (FlowerTune's largest
# domain has ~10^5); the bound keeps float weights exact and sums far from overflow.
MAX_EXAMPLES = 10**9
MAX_LOSS = 1e6  # cross-entropy of a real model stays far below; larger is a broken or forged reply
# The .npy header of one tensor (dtype, shape, padding); numpy pads it to a multiple of 64 bytes.
TENSOR_HEADER_SLACK = 4096
MAX_NAME_CHARS = 200
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Optional per-round figures a train reply may carry: non-negative finite numbers when present.
OPTIONAL_TRAIN_METRICS = (
    p.TOKENS,
    p.TOKENS_PER_SECOND,
    p.TRAIN_SECONDS,
    *(p.metric_key(field) for field in p.MEMORY_FIELDS),
    *(p.metric_key(field) for field in p.DP_FIELDS),  # only from a silo whose policy has [privacy]
)


class ReplyRejected(ValueError):
    """A silo reply failed a check; ``code`` is a silotune.protocol reason code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Handshake:
    silo: str
    model_sha256: str
    rank: int
    num_examples: int
    num_eval_examples: int


@dataclass(frozen=True)
class TrainReply:
    state: OrderedDict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]  # only the checked, known keys


@dataclass(frozen=True)
class EvalReply:
    loss: float
    num_examples: int


# -- records and scalars ----------------------------------------------------------------------------
def _record(content: Any, name: str, kind: type) -> Any:
    if not isinstance(content, RecordDict):
        raise ReplyRejected(p.R_MISSING_RECORD, "reply content is not a RecordDict")
    if name not in content:
        raise ReplyRejected(p.R_MISSING_RECORD, f"reply has no {name!r} record")
    rec = content[name]
    if not isinstance(rec, kind):
        raise ReplyRejected(p.R_MISSING_RECORD, f"{name!r} is a {type(rec).__name__}, not a {kind.__name__}")
    return rec


def _get(rec: Any, key: str, where: str) -> Any:
    if key not in rec:
        raise ReplyRejected(p.R_MISSING_KEY, f"{where} lacks {key!r}")
    return rec[key]


def _number(value: Any, key: str) -> float:
    # bool is an int subclass: True must not count as one example.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyRejected(p.R_WRONG_TYPE, f"{key} is a {type(value).__name__}, not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ReplyRejected(p.R_NOT_FINITE, f"{key} is {value}")
    return float(value)


def count(value: Any, key: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; an integral float is accepted, -0.0 and 0 are not above lo=1."""
    x = _number(value, key)
    if isinstance(value, float) and not x.is_integer():
        raise ReplyRejected(p.R_WRONG_TYPE, f"{key} is {value}, not a whole number")
    if math.copysign(1.0, x) < 0 or not lo <= x <= hi:  # copysign: -0.0 is refused as negative
        raise ReplyRejected(p.R_OUT_OF_RANGE, f"{key} is {value!r}, outside [{lo}, {hi}]")
    return int(x)


def real(value: Any, key: str, lo: float, hi: float) -> float:
    x = _number(value, key)
    if not lo <= x <= hi:
        raise ReplyRejected(p.R_OUT_OF_RANGE, f"{key} is {value!r}, outside [{lo:g}, {hi:g}]")
    return x


def text(value: Any, key: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise ReplyRejected(p.R_WRONG_TYPE, f"{key} is a {type(value).__name__}, not a string")
    if not value or len(value) > MAX_NAME_CHARS or (pattern is not None and not pattern.match(value)):
        raise ReplyRejected(p.R_OUT_OF_RANGE, f"{key} is not a valid value ({value[:40]!r})")
    return value


# -- replies --------------------------------------------------------------------------------------------
def check_handshake(content: Any, max_rank: int) -> Handshake:
    """Identity, rank and data sizes a silo declares; the rank must be in [1, max_rank]."""
    info = _record(content, p.REC_INFO, ConfigRecord)
    metrics = _record(content, p.REC_METRICS, MetricRecord)
    silo = text(_get(info, p.SILO, p.REC_INFO), p.SILO)
    sha = text(_get(info, p.MODEL_SHA256, p.REC_INFO), p.MODEL_SHA256, SHA256)
    rank_value = _get(metrics, p.LORA_RANK, p.REC_METRICS)
    try:
        rank = count(rank_value, p.LORA_RANK, 1, max_rank)
    except ReplyRejected as exc:  # a rank outside the bounds has its own code (the memory attack)
        raise ReplyRejected(p.R_RANK if exc.code == p.R_OUT_OF_RANGE else exc.code, exc.detail) from None
    n = count(_get(metrics, p.NUM_EXAMPLES, p.REC_METRICS), p.NUM_EXAMPLES, 1, MAX_EXAMPLES)
    n_eval = count(_get(metrics, p.NUM_EVAL_EXAMPLES, p.REC_METRICS), p.NUM_EVAL_EXAMPLES, 0, MAX_EXAMPLES)
    return Handshake(silo, sha, rank, n, n_eval)


def check_arrays(content: Any, expected: dict[str, tuple[int, ...]]) -> OrderedDict[str, np.ndarray]:
    """The adapter tensors: the expected names only, float32, the expected shapes, no extra bytes,
    finite values. Shapes, dtypes and sizes are read from the wire metadata before decoding."""
    rec = _record(content, p.REC_ARRAYS, ArrayRecord)
    names = set(rec.keys())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise ReplyRejected(
            p.R_TENSOR_SET, f"{len(missing)} missing ({missing[:3]}), {len(extra)} unexpected ({extra[:3]})"
        )
    budget = sum(4 * math.prod(s) + TENSOR_HEADER_SLACK for s in expected.values())
    if rec.count_bytes() > budget:
        raise ReplyRejected(p.R_OVERSIZED, f"{rec.count_bytes()} bytes, at most {budget} expected")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key in sorted(expected):
        arr, shape = rec[key], tuple(expected[key])
        if str(arr.dtype) != "float32":
            raise ReplyRejected(p.R_DTYPE, f"{key} is {arr.dtype}, expected float32")
        if tuple(arr.shape) != shape:
            raise ReplyRejected(p.R_SHAPE, f"{key} has shape {tuple(arr.shape)}, expected {shape}")
        if len(arr.data) > 4 * math.prod(shape) + TENSOR_HEADER_SLACK:
            raise ReplyRejected(p.R_OVERSIZED, f"{key} carries {len(arr.data)} bytes for shape {shape}")
        try:
            value = arr.numpy()
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the silo's fault
            raise ReplyRejected(p.R_MALFORMED, f"{key} cannot be decoded: {type(exc).__name__}") from None
        # The metadata could lie about the payload: check what was actually decoded too.
        if value.dtype != np.float32 or value.shape != shape:
            raise ReplyRejected(p.R_MALFORMED, f"{key} decodes to {value.dtype}{value.shape}, not its header")
        if not np.isfinite(value).all():
            raise ReplyRejected(p.R_TENSOR_VALUES, f"{key} holds NaN or Inf")
        out[key] = value
    return out


def check_encoded_arrays(
    content: Any, sent: dict[str, np.ndarray], enc: Encoding
) -> OrderedDict[str, np.ndarray]:
    """A reply in a packed transport format: the silo's adapter (fp32), or rebuilt from its update.

    The size is bounded by what the run's format needs for the adapter that was sent before
    anything is decoded; the codec then checks format, block size, tensor list and exact byte
    counts (silotune/wire_codec.py) before it dequantizes."""
    rec = _record(content, p.REC_ARRAYS, ArrayRecord)
    n_values = sum(int(v.size) for v in sent.values())
    data_bytes, n_scales = packed_sizes(n_values, enc)
    budget = data_bytes + 4 * n_scales + 3 * TENSOR_HEADER_SLACK + MAX_NAME_CHARS * (len(sent) + 8) * 4
    if rec.count_bytes() > budget:
        raise ReplyRejected(p.R_OVERSIZED, f"{rec.count_bytes()} bytes, at most {budget} expected")
    try:
        arrays = {key: rec[key].numpy() for key in rec.keys()}
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the silo's fault
        raise ReplyRejected(p.R_MALFORMED, f"packed arrays cannot be decoded: {type(exc).__name__}") from None
    try:
        state = decode_uplink(arrays, sent, enc)
    except CodecError as exc:
        raise ReplyRejected(p.R_ENCODING, str(exc)) from None
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        raise ReplyRejected(p.R_TENSOR_VALUES, f"{bad[0]} holds NaN or Inf")
    return OrderedDict(sorted(state.items()))


def check_train_reply(
    content: Any,
    expected: dict[str, tuple[int, ...]],
    reference_sha: str,
    declared_examples: int,
    rank: int | None,
    sent: dict[str, np.ndarray] | None = None,
    enc: Encoding | None = None,
) -> TrainReply:
    """A train reply: base model, example count (<= the handshake's), rank, loss, tensors."""
    metrics = _record(content, p.REC_METRICS, MetricRecord)
    info = _record(content, p.REC_INFO, ConfigRecord)
    sha = _get(info, p.MODEL_SHA256, p.REC_INFO)
    if sha != reference_sha:
        shown = sha[:12] if isinstance(sha, str) else type(sha).__name__
        raise ReplyRejected(p.R_MODEL, f"trained on base model {shown}, expected {reference_sha[:12]}")
    n = count(_get(metrics, p.NUM_EXAMPLES, p.REC_METRICS), p.NUM_EXAMPLES, 1, MAX_EXAMPLES)
    if n > declared_examples:
        raise ReplyRejected(
            p.R_EXAMPLES_GREW, f"{n} training examples, {declared_examples} declared at the handshake"
        )
    loss = real(_get(metrics, p.TRAIN_LOSS, p.REC_METRICS), p.TRAIN_LOSS, 0.0, MAX_LOSS)
    checked: dict[str, float] = {p.NUM_EXAMPLES: float(n), p.TRAIN_LOSS: loss}
    if p.LORA_RANK in metrics:
        r = count(metrics[p.LORA_RANK], p.LORA_RANK, 1, 1 << 20)
        if rank is not None and r != rank:
            raise ReplyRejected(p.R_RANK, f"trained at rank {r}, declared {rank} at the handshake")
        checked[p.LORA_RANK] = float(r)
    for key in OPTIONAL_TRAIN_METRICS:
        if key in metrics:
            checked[key] = real(metrics[key], key, 0.0, math.inf)
    if enc is not None and enc.packed and sent is not None:
        state = check_encoded_arrays(content, sent, enc)
    else:
        rec = _record(content, p.REC_ARRAYS, ArrayRecord)
        if META_KEY in rec.keys():
            raise ReplyRejected(p.R_ENCODING, "a packed payload in a run whose transport.pack is false")
        state = check_arrays(content, expected)
    return TrainReply(state, n, checked)


def check_eval_reply(content: Any, declared_eval_examples: int) -> EvalReply:
    """An evaluation reply: a finite loss on 1..(declared at the handshake) examples."""
    metrics = _record(content, p.REC_METRICS, MetricRecord)
    n = count(_get(metrics, p.NUM_EXAMPLES, p.REC_METRICS), p.NUM_EXAMPLES, 1, MAX_EXAMPLES)
    if n > declared_eval_examples:
        raise ReplyRejected(
            p.R_EXAMPLES_GREW, f"{n} evaluation examples, {declared_eval_examples} declared at the handshake"
        )
    loss = real(_get(metrics, p.EVAL_LOSS, p.REC_METRICS), p.EVAL_LOSS, 0.0, MAX_LOSS)
    return EvalReply(loss, n)


def check_init_reply(content: Any) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """The initial adapter one silo provides: float32 finite tensors and a JSON PEFT config.

    There is nothing yet to compare shapes with, so the shapes are taken from the reply itself
    (bounded by Flower's message size); the config must parse as a JSON object.
    """
    info = _record(content, p.REC_INFO, ConfigRecord)
    rec = _record(content, p.REC_ARRAYS, ArrayRecord)
    raw = _get(info, p.PEFT_CONFIG, p.REC_INFO)
    if not isinstance(raw, str):
        raise ReplyRejected(p.R_WRONG_TYPE, f"{p.PEFT_CONFIG} is a {type(raw).__name__}, not a string")
    try:
        peft_config = json.loads(raw)
    except ValueError:
        raise ReplyRejected(p.R_MALFORMED, f"{p.PEFT_CONFIG} is not JSON") from None
    if not isinstance(peft_config, dict):
        raise ReplyRejected(p.R_MALFORMED, f"{p.PEFT_CONFIG} is not a JSON object")
    if not list(rec.keys()):
        raise ReplyRejected(p.R_TENSOR_SET, "the initial adapter has no tensors")
    if META_KEY in rec.keys():  # packed fp32 (transport.pack): the shapes are in its metadata
        return _packed_init(rec), peft_config
    shapes = {k: tuple(int(d) for d in rec[k].shape) for k in rec.keys()}
    return check_arrays(content, shapes), peft_config


def _packed_init(rec: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """A packed fp32 initial adapter: the codec checks its byte counts against its own tensor list."""
    try:
        arrays = {key: rec[key].numpy() for key in rec.keys()}
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the silo's fault
        raise ReplyRejected(p.R_MALFORMED, f"packed arrays cannot be decoded: {type(exc).__name__}") from None
    try:
        shapes = payload_shapes(arrays)
        state = decode(arrays, Encoding("fp32"), shapes)
    except CodecError as exc:
        raise ReplyRejected(p.R_ENCODING, str(exc)) from None
    if not state:
        raise ReplyRejected(p.R_TENSOR_SET, "the initial adapter has no tensors")
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        raise ReplyRejected(p.R_TENSOR_VALUES, f"{bad[0]} holds NaN or Inf")
    return OrderedDict(sorted(state.items()))
