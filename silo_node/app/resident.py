"""What a resident silo worker keeps loaded between messages: base model + adapter, data, encodings.

Flower's per-message ClientApp process loads the base model, reads the data and tokenizes it for
every message. The resident worker (silo_node/ops/worker.py) runs the same ClientApp in one long-lived
process, so these caches make round 2 cost only the training. Each cache is keyed on what would
change its content, so a changed base model (weights' SHA-256), data file (path, mtime, size) or
setting is noticed and reloaded, never served stale. The silo policy is re-read on every message by
``client_app.policy_gate`` already (a TOML file: cheap), so a changed policy applies at once.

In a per-message process (``--executor per-message``) each cache holds one entry for one message,
and the behaviour is what it always was; ``RESIDENT`` only changes what evaluation reuses.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from silotune.config import ModelConfig, PeftSettings, RunConfig, SiloConfig

# Set by the resident worker: evaluation then reuses the training model instead of loading a
# second copy (the per-message path loads one with for_training=False, as it always did).
RESIDENT = False
_LOCK = threading.Lock()  # the worker serves one message at a time; the lock makes that explicit


@dataclass
class ModelSlot:
    """A loaded base model wrapped in its adapter, and the adapter's seeded initial state."""

    loaded: Any  # silotune.modeling.LoadedModel
    peft_model: Any
    init_state: OrderedDict[str, np.ndarray]
    key: tuple[Any, ...]


@dataclass
class Counters:
    """How often the worker (re)built each cache: the silo's events report these."""

    model_loads: int = 0
    data_loads: int = 0
    encodes: int = 0


counters = Counters()
_model: ModelSlot | None = None
_records: tuple[tuple[Any, ...], tuple[list[dict], list[dict]]] | None = None
_encoded: dict[tuple[Any, ...], list[Any]] = {}
_optimizer_state: dict[tuple[Any, ...], Any] = {}


def _model_key(cfg: ModelConfig, peft: PeftSettings, rank: int, seed: int, for_training: bool) -> tuple:
    from silotune.modeling import model_identity

    # The weights' SHA-256 (cached by path/size/mtime in silotune.modeling): new files, new key.
    sha = model_identity(cfg.name).sha256
    return (sha, cfg.model_dump_json(), peft.model_dump_json(), rank, seed, for_training)


def model_with_adapter(
    cfg: ModelConfig, peft: PeftSettings, rank: int, seed: int, for_training: bool = True
) -> ModelSlot:
    """The base model with a LoRA adapter of ``rank`` attached; loaded once per key.

    PEFT injects its layers into the base model in place, so one base model carries exactly one
    adapter configuration: a different rank or method means a fresh load (FlexLoRA silos keep
    one rank, so this is rare). Callers load the received adapter state into ``peft_model``.
    """
    global _model
    from silotune.adapters import adapter_state, attach_adapter
    from silotune.modeling import load_model

    if RESIDENT:
        for_training = True  # one copy serves training and evaluation (no_grad, eval mode)
    key = _model_key(cfg, peft, rank, seed, for_training)
    if _model is not None and _model.key == key:
        return _model
    release_model()
    loaded = load_model(cfg, for_training=for_training)
    peft_model = attach_adapter(loaded.model, peft, rank, seed)
    _model = ModelSlot(loaded, peft_model, adapter_state(peft_model), key)
    counters.model_loads += 1
    return _model


def release_model() -> None:
    """Drop the cached model (and what was built on it) and give the memory back."""
    global _model
    _model = None
    _encoded.clear()
    _optimizer_state.clear()
    gc.collect()


def _file_key(path: str) -> tuple[Any, ...]:
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        return (path, None, None)  # a hub dataset id or a missing file: the loader decides
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def records(run: RunConfig, silo: SiloConfig) -> tuple[list[dict], list[dict]]:
    """The silo's (train, eval) rows; re-read when the file or the settings that shape it change."""
    global _records
    from silo_node.app.data import load_silo_records, split_train_eval

    key = (_file_key(silo.data_path), silo.model_dump_json(), run.domain, run.train.seed)
    if _records is not None and _records[0] == key:
        return _records[1]
    rows = load_silo_records(silo, run.domain)
    value = split_train_eval(rows, silo.eval_fraction, run.train.seed)
    _records = (key, value)
    _encoded.clear()
    counters.data_loads += 1
    return value


def encoded(slot: ModelSlot, run: RunConfig, silo: SiloConfig, part: str, rows: list[dict]) -> list[Any]:
    """Tokenized examples of ``part`` ('train' or 'eval'); encoded once per data and settings."""
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_records

    data_key = _records[0] if _records is not None else None
    domain = silo.domain or run.domain
    key = (
        part, data_key, slot.key[0], domain, run.train.seq_length,
        run.model.use_chat_template, run.train.prompt_style, len(rows),
    )  # fmt: skip
    if key in _encoded:
        return _encoded[key]
    value = encode_records(
        slot.loaded.tokenizer,
        get_template(domain),
        rows,
        run.train.seq_length,
        run.model.use_chat_template,
        run.train.prompt_style,
    )
    _encoded[key] = value
    counters.encodes += 1
    return value


def optimizer_slot(run_id: int, silo: SiloConfig) -> dict[str, Any]:
    """Where ``train.keep-optimizer-state`` keeps AdamW's state between rounds of one run."""
    key = (run_id, silo.name)
    if key not in _optimizer_state:
        _optimizer_state.clear()  # one run at a time keeps its state; an old run's is freed
        _optimizer_state[key] = {}
    return _optimizer_state[key]


def after_message(slot: ModelSlot | None) -> None:
    """Free what a round leaves behind (gradients, autograd graphs) so RSS stays flat."""
    if slot is not None:
        for p in slot.peft_model.parameters():
            p.grad = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is always there at a silo
        pass


def current_rss_bytes() -> int:
    """This process's resident memory now (not its peak), from /proc."""
    try:
        with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def lock() -> threading.Lock:
    return _LOCK
