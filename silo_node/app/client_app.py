"""The ClientApp: what a silo does when the SuperLink asks (handshake, train, evaluate).

Flower runs this in a short-lived process next to the silo's private data. Only adapter tensors and
numbers leave: the reply holds an ArrayRecord (the adapter state), a MetricRecord (loss, examples,
tokens, throughput, memory) and a ConfigRecord (base-model identity, rank). Data never leaves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from silo_node.app import resident
from silo_node.app.allotment import allotted, apply_threads_from_env
from silo_node.app.audit import append_audit, arrays_sha256, is_approved, pending_since
from silo_node.app.memory import MemoryMeter
from silo_node.app.optimizer_state import OptimizerStore
from silo_node.app.policy import (
    POLICY_ENV,
    PolicyError,
    SiloPolicy,
    check_model_hash,
    check_run,
    check_silo_rank,
    load_policy,
    pinned_hash,
)
from silo_node.app.privacy import round_budget, train_round_dp
from silo_node.app.runtime_auth import silo_settings
from silo_node.app.start_adapter import start_state
from silo_node.app.training import evaluate_loss, round_seed, train_round
from silotune import protocol as p
from silotune.adapters import (
    adapter_state,
    from_array_record,
    load_adapter_state,
    peft_config_dict,
    state_digest,
    to_array_record,
)
from silotune.config import RunConfig, SiloConfig, parse_run_config
from silotune.errors import ApprovalPending, InitRefused, ModelMismatchError, PolicyRefused, UserError
from silotune.events import EventLog
from silotune.modeling import model_identity
from silotune.silo_failures import SiloFailure, classify, reason_for
from silotune.wire_codec import (
    Encoding,
    ErrorFeedback,
    decode,
    encode,
    encode_uplink,
    encoding_for,
    float32_nbytes,
)

app = ClientApp()


def _settings(context: Context) -> tuple[RunConfig, SiloConfig]:
    run = parse_run_config(dict(context.run_config))
    silo = silo_settings(context)
    return run, silo


def silo_rank(run: RunConfig, silo: SiloConfig) -> int:
    """FlexLoRA lets each silo declare its own rank; every other strategy needs the global one."""
    if run.strategy.name == "flexlora" and silo.lora_rank:
        return silo.lora_rank
    return run.peft.rank


def _records(run: RunConfig, silo: SiloConfig) -> tuple[list[dict], list[dict]]:
    # Cached by file path+mtime+size in a resident worker (silo_node/app/resident.py).
    return resident.records(run, silo)


Handler = Callable[[Message, Context], Message]


def reply_with_failure_code(handler: Handler) -> Handler:
    """Turn any exception into an error reply holding only a code and its fixed text.

    The full exception, with its traceback, goes to this silo's own log (the SuperNode's output):
    a data error quotes private rows, and Flower's default reply would carry it to the central site.
    """

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure must leave as a code only
            code = classify(exc)
            name = handler.__name__
            if code in (
                SiloFailure.POLICY_REFUSED,
                SiloFailure.APPROVAL_PENDING,
                SiloFailure.PRIVACY_BUDGET_EXHAUSTED,
            ):
                # The reason is the silo's own decision, not a bug: one line, no traceback.
                log(WARNING, "SiloTune %s: %s (sent as code %s)", name, exc, code.name)
            else:
                log(ERROR, "SiloTune %s failed (%s, sent as code %d)", name, code.name, code, exc_info=exc)
            return Message(Error(code=int(code), reason=reason_for(code)), reply_to=msg)

    return wrapped


_FAB_DIR = re.compile(r"\.([0-9a-f]{8,64})$")


def app_identity() -> dict[str, str]:
    """What code served the run, as far as the ClientApp can tell.

    Flower 1.41 does not hand the FAB hash to the ClientApp (run_clientapp.py keeps ``Run`` and
    ``Fab`` to itself), nor who submitted the run. What is reachable: the installed app directory,
    named ``<publisher>.<app>.<version>.<fab-hash prefix>`` when the code came from a FAB, this
    module's SHA-256 and the installed silotune version."""
    here = Path(__file__).resolve()
    fab_prefix = ""
    for parent in here.parents:
        m = _FAB_DIR.search(parent.name)
        if m and parent.parent.name == "apps":
            fab_prefix = m.group(1)
            break
    try:
        from importlib.metadata import version

        silotune_version = version("silotune")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        silotune_version = "unknown"
    return {
        "fab_hash_prefix": fab_prefix,
        "app_module": str(here),
        "app_module_sha256": hashlib.sha256(here.read_bytes()).hexdigest(),
        "silotune_version": silotune_version,
    }


def _run_config_sha256(context: Context) -> str:
    flat = dict(context.run_config)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def _audit(silo: SiloConfig, kind: str, **fields: Any) -> None:
    if silo.state_dir:
        append_audit(silo.state_dir, kind, silo=silo.name, **fields)


def _load_policy(silo: SiloConfig) -> SiloPolicy:
    try:
        return load_policy(silo.policy_file or os.environ.get(POLICY_ENV, ""))
    except PolicyError as exc:  # a broken policy refuses everything; the reason names file and key
        raise PolicyRefused(str(exc)) from None


def _first_sight(silo: SiloConfig, run_id: str) -> bool:
    """True once per run (a marker in the state dir), so the audit log lists each run once."""
    if not silo.state_dir:
        return False
    marker = Path(silo.state_dir) / "runs" / f"{run_id}.seen"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def policy_gate(msg: Message, context: Context, phase: str) -> tuple[RunConfig, SiloConfig]:
    """First thing for every message: the silo's policy decides, before any model is loaded.

    Raises PolicyRefused (-> POLICY_REFUSED), ApprovalPending (-> APPROVAL_PENDING) or ConfigError;
    every refusal is audited with its full reason, which never leaves the silo.

    The silo's settings (policy file, data path, state dir, ...) come from its own launch
    (silo_node/app/runtime_auth.py), never from the task's context, which whoever held the previous
    task on this host's Runtime API may have pushed back changed."""
    silo = silo_settings(context)
    run_id = str(context.run_id)
    base = {"run_id": run_id, "phase": phase, "round": _round_of(msg)}
    try:
        policy = _load_policy(silo)
        run = parse_run_config(dict(context.run_config))
        check_run(policy, run)
        check_silo_rank(policy, silo_rank(run, silo))
        if pinned_hash(policy, run.model.name):
            check_model_hash(policy, run.model.name, model_identity(run.model.name).sha256)
        if policy.require_approval:
            _check_approval(policy, silo, run_id, context, run)
    except ApprovalPending:
        raise
    except UserError as exc:
        _audit(silo, "refused", reason=str(exc), **base)
        raise
    if _first_sight(silo, run_id):
        _audit(
            silo,
            "run",
            run_id=run_id,
            node_id=str(context.node_id),
            model=run.model.name,
            run_config_sha256=_run_config_sha256(context),
            submitted_by="not exposed to the ClientApp by Flower 1.41",
            **app_identity(),
        )
    return run, silo


def _round_of(msg: Message) -> int:
    try:
        return int(msg.content[p.REC_CONFIG].get(p.SERVER_ROUND, 0)) if p.REC_CONFIG in msg.content else 0
    except (TypeError, ValueError, KeyError):
        return 0


def _check_approval(
    policy: SiloPolicy, silo: SiloConfig, run_id: str, context: Context, run: RunConfig
) -> None:
    if not silo.state_dir:
        raise PolicyRefused(
            "the policy has require-approval = true but the silo has no state-dir to keep approvals in"
        )
    if is_approved(silo.state_dir, run_id):
        return
    now = time.time()
    since, first = pending_since(silo.state_dir, run_id, now)
    if now - since > policy.approval_timeout_hours * 3600:
        raise PolicyRefused(
            f"run {run_id} was not approved within approval-timeout-hours={policy.approval_timeout_hours:g}"
        )
    if first:
        _audit(
            silo,
            "pending",
            run_id=run_id,
            model=run.model.name,
            run_config_sha256=_run_config_sha256(context),
            hint=f"silotune silo approve {run_id}",
        )
    raise ApprovalPending(
        f"run {run_id} waits for approval: run `silotune silo approve {run_id}` at this silo"
    )


@app.query()
@reply_with_failure_code
def handshake(msg: Message, context: Context) -> Message:
    """Who am I: base-model identity, rank, data size; optionally the initial adapter."""
    run, silo = policy_gate(msg, context, "handshake")
    train_records, eval_records = _records(run, silo)  # validates the data before any round
    identity = model_identity(run.model.name)
    info = ConfigRecord(
        {
            p.SILO: silo.name,
            p.MODEL_NAME: identity.name,
            p.MODEL_SHA256: identity.sha256,
            p.DOMAIN: silo.domain or run.domain,
        }
    )
    content = RecordDict(
        {
            p.REC_INFO: info,
            p.REC_METRICS: MetricRecord(
                {
                    p.LORA_RANK: silo_rank(run, silo),
                    p.NUM_EXAMPLES: len(train_records),
                    p.NUM_EVAL_EXAMPLES: len(eval_records),
                }
            ),
        }
    )
    config = msg.content[p.REC_CONFIG] if p.REC_CONFIG in msg.content else {}
    want_init = bool(config.get(p.WANT_INIT, False))
    if want_init:
        # The adapter's seeded initial state, kept aside when it was attached: a resident
        # worker's live adapter may hold an earlier round's weights.
        rank = silo_rank(run, silo)
        slot = resident.model_with_adapter(run.model, run.peft, rank, run.train.seed)
        start = _start(run, silo, context, rank, slot.init_state)
        # Full precision whatever transport.dtype says, packed unless transport.pack is off.
        init_wire = encode(start, Encoding("fp32", pack=run.transport.pack))
        content[p.REC_ARRAYS] = init_arrays = to_array_record(init_wire)
        info[p.PEFT_CONFIG] = json.dumps(peft_config_dict(slot.peft_model))
        _audit_payload(silo, context, 0, "init", init_arrays)
    return Message(content=content, reply_to=msg)


def _received_adapter(msg: Message, peft_model: Any, enc: Encoding) -> dict[str, Any]:
    """The adapter in the message, decoded from the run's transport.dtype (silotune/wire_codec.py);
    a payload in another encoding or of other shapes is refused before it is loaded."""
    arrays = from_array_record(msg.content[p.REC_ARRAYS])
    if not enc.packed:
        return arrays
    expected = {k: tuple(v.shape) for k, v in adapter_state(peft_model).items()}
    return decode(arrays, enc, expected)


# In-process fallback for silos without a state dir: a resident worker keeps it across rounds.
_RESIDUALS: dict[str, ErrorFeedback] = {}


def _error_feedback(run: RunConfig, silo: SiloConfig, context: Context) -> ErrorFeedback | None:
    """This silo's quantization residual for this run (transport.error-feedback), on disk in its
    state dir so that it survives the per-message process and worker restarts."""
    if not run.transport.error_feedback or run.transport.dtype == "fp32":
        return None
    name = f"run-{context.run_id}-residual.safetensors"
    if silo.state_dir:
        return ErrorFeedback(Path(silo.state_dir) / "transport" / name)
    return _RESIDUALS.setdefault(name, ErrorFeedback())


def _optimizer_store(run: RunConfig, silo: SiloConfig, context: Context) -> OptimizerStore | None:
    """This silo's AdamW state for this run (train.keep-optimizer-state), on disk in its state dir
    so that it survives the per-message process and worker restarts; without a state dir, in the
    resident worker's memory. It never leaves the silo."""
    if not run.train.keep_optimizer_state:
        return None
    if silo.state_dir:
        return OptimizerStore(Path(silo.state_dir) / "optimizer" / f"run-{context.run_id}-adamw.safetensors")
    return OptimizerStore(memory=resident.optimizer_slot(context.run_id, silo))


def _start(run: RunConfig, silo: SiloConfig, context: Context, rank: int, seeded: dict[str, Any]) -> dict:
    """The adapter this silo would start the run from: its own from train.seed, or the start adapter
    its policy pins (silo_node/app/start_adapter.py); a refusal is audited like the gate's."""
    try:
        return start_state(_load_policy(silo), run, rank, seeded)
    except UserError as exc:
        _audit(silo, "refused", reason=str(exc), run_id=str(context.run_id), phase="start-adapter")
        raise


def _check_start(msg_cfg: ConfigRecord, run: RunConfig, rank: int, init_state: dict[str, Any]) -> None:
    """While the run is at its start, the central site sends the agreed initial adapter's hash:
    this silo trains from it only if it is the adapter this silo would start from itself, derived
    from train.seed or its policy's pinned start adapter (a silo at another FlexLoRA rank holds
    another one and cannot compare)."""
    claimed = str(msg_cfg.get(p.INITIAL_SHA256, ""))
    if not claimed or rank != run.peft.rank:
        return
    mine = state_digest(init_state)
    if claimed != mine:
        source = (
            f"the start adapter its policy pins for peft.start-adapter={run.peft.start_adapter[:12]}..."
            if run.peft.start_adapter
            else f"{mine[:12]} from train.seed={run.train.seed}"
        )
        raise InitRefused(
            f"the run starts from an initial adapter with sha256 {claimed[:12]}, but this silo derives "
            f"{source}: another silo chose it, or this silo's base model, torch or peft differs from "
            "the others'"
        )


def _check_identity(msg_cfg: ConfigRecord, run: RunConfig) -> None:
    expected = str(msg_cfg.get(p.MODEL_SHA256, ""))
    mine = model_identity(run.model.name)
    if expected and expected != mine.sha256:
        raise ModelMismatchError(
            f"this silo's base model {mine.short()} differs from the federation's "
            f"({msg_cfg.get(p.MODEL_NAME)}@{expected[:12]}); install the same model files"
        )


@app.train()
@reply_with_failure_code
def train(msg: Message, context: Context) -> Message:
    run, silo = policy_gate(msg, context, "train")
    cfg = msg.content[p.REC_CONFIG]
    server_round = int(cfg[p.SERVER_ROUND])
    _check_identity(cfg, run)
    # Events go to $SILOTUNE_EVENTS_DIR (set by `silotune silo start`) and to state-dir if given.
    events = EventLog(p.SILO, [Path(silo.state_dir) / "silo.jsonl"] if silo.state_dir else None)
    train_records, _ = _records(run, silo)
    threads = apply_threads_from_env() or allotted()[0]
    meter = MemoryMeter()
    meter.start()
    rank = silo_rank(run, silo)
    # Loaded once per base model in a resident worker; the received adapter is swapped in.
    slot = resident.model_with_adapter(run.model, run.peft, rank, run.train.seed)
    loaded, peft_model = slot.loaded, slot.peft_model
    if cfg.get(p.INITIAL_SHA256):  # only while the global adapter is still the start
        _check_start(cfg, run, rank, _start(run, silo, context, rank, slot.init_state))
    enc = encoding_for(run.transport)
    received = _received_adapter(msg, peft_model, enc)
    load_adapter_state(peft_model, received)
    examples = resident.encoded(slot, run, silo, "train", train_records)
    optimizer = _optimizer_store(run, silo, context)
    # [privacy] in the silo's policy (never the run config): DP-SGD, refused past its epsilon budget.
    privacy = _load_policy(silo).privacy
    with round_budget(privacy, run, silo, str(context.run_id), server_round, len(examples)) as dp:
        train = train_round if dp is None else functools.partial(train_round_dp, plan=dp)
        result = train(
            peft_model,
            loaded.tokenizer,
            examples,
            run.train,
            lr=float(cfg[p.LR]),
            seed=round_seed(run.train.seed, silo.name, server_round),
            proximal_mu=float(cfg.get(p.PROXIMAL_MU, 0.0)),
            optimizer_state=optimizer.load() if optimizer is not None else None,
        )
        if dp is not None:
            dp.commit()  # spent before the adapter leaves; the ledger stays locked until here
    dp_fields = dp.metrics() if dp is not None else {}
    peaks = meter.stop()
    trained = adapter_state(peft_model)
    arrays = to_array_record(encode_uplink(trained, received, enc, _error_feedback(run, silo, context)))
    if optimizer is not None and result.optimizer_state is not None:
        optimizer.save(result.optimizer_state)  # kept here for the next round; never in the reply
    resident.after_message(slot)  # gradients and graphs go before the reply is built
    gpus = allotted()[1]
    metrics: dict[str, Any] = {
        p.TRAIN_LOSS: result.train_loss,
        p.NUM_EXAMPLES: result.examples,
        p.TOKENS: result.tokens,
        p.TOKENS_PER_SECOND: result.tokens_per_second,
        p.TRAIN_SECONDS: result.train_seconds,
        p.LORA_RANK: rank,
        p.THREADS: threads,
        p.GPUS: gpus,
        **{k.replace("_", "-"): v for k, v in peaks.as_dict().items()},
        **{p.metric_key(k): v for k, v in dp_fields.items()},
    }
    uplink = arrays.count_bytes()
    downlink = msg.content[p.REC_ARRAYS].count_bytes()
    _audit_payload(silo, context, server_round, "train", arrays)
    events.emit(
        p.EV_LOCAL_TRAIN,
        round=server_round,
        silo=silo.name,
        train_loss=result.train_loss,
        examples=result.examples,
        tokens=result.tokens,
        tokens_per_second=result.tokens_per_second,
        train_seconds=result.train_seconds,
        uplink_bytes=uplink,
        downlink_bytes=downlink,
        # The same adapter as float32 each way: what transport.dtype=fp32 would have moved.
        uplink_fp32_bytes=float32_nbytes(trained),
        downlink_fp32_bytes=float32_nbytes(received),
        lora_rank=rank,
        threads=threads,
        gpus=gpus,
        # How often this process loaded the base model: stays 1 across rounds in a resident worker.
        worker_model_loads=resident.counters.model_loads,
        worker_rss_bytes=resident.current_rss_bytes(),
        **peaks.as_dict(),
        **dp_fields,
    )
    info = ConfigRecord({p.SILO: silo.name, p.MODEL_SHA256: loaded.identity.sha256})
    return Message(
        content=RecordDict({p.REC_ARRAYS: arrays, p.REC_METRICS: MetricRecord(metrics), p.REC_INFO: info}),
        reply_to=msg,
    )


@app.evaluate()
@reply_with_failure_code
def evaluate(msg: Message, context: Context) -> Message:
    """Response-only loss of the global adapter on this silo's held-out slice (eval-fraction)."""
    run, silo = policy_gate(msg, context, "evaluate")
    cfg = msg.content[p.REC_CONFIG]
    _check_identity(cfg, run)
    _, eval_records = _records(run, silo)
    metrics: dict[str, Any] = {p.NUM_EXAMPLES: len(eval_records)}
    if eval_records:
        apply_threads_from_env()
        slot = resident.model_with_adapter(
            run.model, run.peft, silo_rank(run, silo), run.train.seed, for_training=False
        )
        load_adapter_state(
            slot.peft_model, _received_adapter(msg, slot.peft_model, encoding_for(run.transport))
        )
        examples = resident.encoded(slot, run, silo, "eval", eval_records)
        metrics[p.EVAL_LOSS] = evaluate_loss(
            slot.peft_model, slot.loaded.tokenizer, examples, run.train.batch_size
        )
        resident.after_message(slot)
    return Message(
        content=RecordDict(
            {p.REC_METRICS: MetricRecord(metrics), p.REC_INFO: ConfigRecord({p.SILO: silo.name})}
        ),
        reply_to=msg,
    )


def _audit_payload(silo: SiloConfig, context: Context, server_round: int, phase: str, arrays: Any) -> None:
    """Every adapter that leaves: its bytes (as the central site counts them) and its SHA-256."""
    _audit(
        silo,
        "payload",
        run_id=str(context.run_id),
        round=server_round,
        phase=phase,
        bytes=int(arrays.count_bytes()),
        sha256=arrays_sha256(arrays),
    )


__all__ = ["app", "policy_gate", "silo_rank"]
