"""The ClientApp: what a silo does when the SuperLink asks (handshake, train, evaluate).

Flower runs this in a short-lived process next to the silo's private data. Only adapter tensors and
numbers leave: the reply holds an ArrayRecord (the adapter state), a MetricRecord (loss, examples,
tokens, throughput, memory) and a ConfigRecord (base-model identity, rank). Data never leaves.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from silo_node.data import load_silo_records, split_train_eval
from silo_node.memory import MemoryMeter
from silo_node.templates import get_template
from silo_node.training import encode_records, evaluate_loss, train_round
from silotune.adapters import (
    adapter_state,
    attach_adapter,
    from_array_record,
    load_adapter_state,
    peft_config_dict,
    to_array_record,
)
from silotune.config import RunConfig, SiloConfig, parse_run_config, parse_silo_config
from silotune.errors import ModelMismatchError
from silotune.events import EventLog
from silotune.modeling import load_model, model_identity
from silotune.silo_failures import classify, reason_for

app = ClientApp()


def _settings(context: Context) -> tuple[RunConfig, SiloConfig]:
    run = parse_run_config(dict(context.run_config))
    silo = parse_silo_config(dict(context.node_config))
    return run, silo


def silo_rank(run: RunConfig, silo: SiloConfig) -> int:
    """FlexLoRA lets each silo declare its own rank; every other strategy needs the global one."""
    if run.strategy.name == "flexlora" and silo.lora_rank:
        return silo.lora_rank
    return run.peft.rank


def _silo_seed(run: RunConfig, silo: SiloConfig, server_round: int) -> int:
    # Different silos must not draw identical batches; crc32 is stable across processes.
    return run.train.seed + 1000 * server_round + zlib.crc32(silo.name.encode()) % 1000


def _records(run: RunConfig, silo: SiloConfig) -> tuple[list[dict], list[dict]]:
    records = load_silo_records(silo, run.domain)
    return split_train_eval(records, silo.eval_fraction, run.train.seed)


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
            log(ERROR, "SiloTune %s failed (%s, sent as code %d)", name, code.name, code, exc_info=exc)
            return Message(Error(code=int(code), reason=reason_for(code)), reply_to=msg)

    return wrapped


@app.query()
@reply_with_failure_code
def handshake(msg: Message, context: Context) -> Message:
    """Who am I: base-model identity, rank, data size; optionally the initial adapter."""
    run, silo = _settings(context)
    train_records, eval_records = _records(run, silo)  # validates the data before any round
    identity = model_identity(run.model.name)
    info = ConfigRecord(
        {
            "silo": silo.name,
            "model-name": identity.name,
            "model-sha256": identity.sha256,
            "domain": silo.domain or run.domain,
        }
    )
    content = RecordDict(
        {
            "info": info,
            "metrics": MetricRecord(
                {
                    "lora-rank": silo_rank(run, silo),
                    "num-examples": len(train_records),
                    "num-eval-examples": len(eval_records),
                }
            ),
        }
    )
    want_init = bool(msg.content["config"].get("want-init", False)) if "config" in msg.content else False
    if want_init:
        loaded = load_model(run.model)
        peft_model = attach_adapter(loaded.model, run.peft, silo_rank(run, silo), run.train.seed)
        content["arrays"] = to_array_record(adapter_state(peft_model))
        info["peft-config"] = json.dumps(peft_config_dict(peft_model))
    return Message(content=content, reply_to=msg)


def _check_identity(msg_cfg: ConfigRecord, run: RunConfig) -> None:
    expected = str(msg_cfg.get("model-sha256", ""))
    mine = model_identity(run.model.name)
    if expected and expected != mine.sha256:
        raise ModelMismatchError(
            f"this silo's base model {mine.short()} differs from the federation's "
            f"({msg_cfg.get('model-name')}@{expected[:12]}); install the same model files"
        )


@app.train()
@reply_with_failure_code
def train(msg: Message, context: Context) -> Message:
    run, silo = _settings(context)
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    _check_identity(cfg, run)
    # Events go to $SILOTUNE_EVENTS_DIR (set by `silotune silo start`) and to state-dir if given.
    events = EventLog("silo", [Path(silo.state_dir) / "silo.jsonl"] if silo.state_dir else None)
    train_records, _ = _records(run, silo)
    meter = MemoryMeter()
    meter.start()
    loaded = load_model(run.model)
    rank = silo_rank(run, silo)
    peft_model = attach_adapter(loaded.model, run.peft, rank, run.train.seed)
    received = from_array_record(msg.content["arrays"])
    load_adapter_state(peft_model, received)
    examples = encode_records(
        loaded.tokenizer,
        get_template(silo.domain or run.domain),
        train_records,
        run.train.seq_length,
        run.model.use_chat_template,
        run.train.prompt_style,
    )
    result = train_round(
        peft_model,
        loaded.tokenizer,
        examples,
        run.train,
        lr=float(cfg["lr"]),
        seed=_silo_seed(run, silo, server_round),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
    )
    peaks = meter.stop()
    arrays = to_array_record(adapter_state(peft_model))
    metrics: dict[str, Any] = {
        "train-loss": result.train_loss,
        "num-examples": result.examples,
        "tokens": result.tokens,
        "tokens-per-second": result.tokens_per_second,
        "train-seconds": result.train_seconds,
        "lora-rank": rank,
        **{k.replace("_", "-"): v for k, v in peaks.as_dict().items()},
    }
    uplink = arrays.count_bytes()
    downlink = msg.content["arrays"].count_bytes()
    events.emit(
        "local_train",
        round=server_round,
        silo=silo.name,
        train_loss=result.train_loss,
        examples=result.examples,
        tokens=result.tokens,
        tokens_per_second=result.tokens_per_second,
        train_seconds=result.train_seconds,
        uplink_bytes=uplink,
        downlink_bytes=downlink,
        lora_rank=rank,
        **peaks.as_dict(),
    )
    info = ConfigRecord({"silo": silo.name, "model-sha256": loaded.identity.sha256})
    return Message(
        content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "info": info}), reply_to=msg
    )


@app.evaluate()
@reply_with_failure_code
def evaluate(msg: Message, context: Context) -> Message:
    """Response-only loss of the global adapter on this silo's held-out slice (eval-fraction)."""
    run, silo = _settings(context)
    cfg = msg.content["config"]
    _check_identity(cfg, run)
    _, eval_records = _records(run, silo)
    metrics: dict[str, Any] = {"num-examples": len(eval_records)}
    if eval_records:
        loaded = load_model(run.model, for_training=False)
        peft_model = attach_adapter(loaded.model, run.peft, silo_rank(run, silo), run.train.seed)
        load_adapter_state(peft_model, from_array_record(msg.content["arrays"]))
        examples = encode_records(
            loaded.tokenizer,
            get_template(silo.domain or run.domain),
            eval_records,
            run.train.seq_length,
            run.model.use_chat_template,
            run.train.prompt_style,
        )
        metrics["eval-loss"] = evaluate_loss(peft_model, loaded.tokenizer, examples, run.train.batch_size)
    return Message(
        content=RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"silo": silo.name})}),
        reply_to=msg,
    )


__all__ = ["app", "silo_rank"]
