"""PEFT adapters: creation by method name, the adapter state that travels, and the wire codec.

Only the adapter state dict crosses the wire (``peft.get_peft_model_state_dict``): LoRA A/B factors,
DoRA magnitude vectors, IA3 scaling vectors. Keys are PEFT's own on-disk names (no adapter name), so
a state can be written straight into ``adapter_model.safetensors`` and loaded with
``PeftModel.from_pretrained``. Tensors travel as float32 whatever the base dtype, so that averaging
never happens in fp16/bf16.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from silotune.atomic_files import atomic_write_json
from silotune.config import PeftSettings
from silotune.errors import UserError

# PEFT's names for a LoRA pair's factors: the one place that spells them (FlexLoRA's re-factoring
# and the defences' Gram matrices both read a module's A and B through these).
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def lora_modules(state: dict[str, np.ndarray]) -> list[str]:
    """Module prefixes that carry a LoRA pair in ``state``."""
    return sorted(
        k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in state
    )


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def build_peft_config(peft: PeftSettings, rank: int | None = None) -> Any:
    """PEFT config for a method name. ``rank`` overrides peft.rank (FlexLoRA silos)."""
    from peft import IA3Config, LoraConfig, TaskType

    targets = peft.target_module_list
    if peft.method in ("lora", "qlora", "dora"):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=rank or peft.rank,
            lora_alpha=peft.alpha,
            lora_dropout=peft.dropout,
            target_modules=targets,
            bias="none",
            use_dora=peft.method == "dora",
        )
    if peft.method == "ia3":
        # IA3 scales the *input* of feed-forward projections and the output of the others.
        names = targets if isinstance(targets, list) else []
        ff = [m for m in names if any(k in m for k in ("down_proj", "fc2", "w2", "c_proj"))]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)
    raise UserError(f"peft.method: unknown method {peft.method!r}")


def attach_adapter(model: Any, peft: PeftSettings, rank: int | None = None, seed: int = 0) -> Any:
    """Wrap a base model in a fresh PEFT adapter (initialisation seeded for reproducibility)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, build_peft_config(peft, rank))
    except ValueError as exc:
        # PEFT says "Target modules {...} not found in the base model": add what to do.
        raise UserError(f"peft.target-modules={peft.target_modules!r}: {exc}") from None
    if peft.freeze_lora_a:
        # A still travels (its delta is zero), so a frozen-A run keeps the adapter's file layout.
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def adapter_state(peft_model: Any) -> OrderedDict[str, np.ndarray]:
    """The adapter tensors that travel, as float32 numpy arrays under PEFT's file key names."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model)
    return OrderedDict((k, v.detach().float().cpu().numpy().copy()) for k, v in sd.items())


def check_state_matches(expected: dict[str, tuple[int, ...]], state: dict[str, np.ndarray], who: str) -> None:
    """Refuse an adapter state whose keys or shapes differ, or that holds NaN/Inf."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{who}: adapter keys differ (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{who}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")
        if not np.isfinite(state[k]).all():
            raise ValueError(f"{who}: tensor {k} contains NaN or Inf")


def load_adapter_state(peft_model: Any, state: dict[str, np.ndarray]) -> None:
    """Load received tensors into the live adapter after checking keys and shapes."""
    import torch
    from peft import set_peft_model_state_dict

    current = adapter_state(peft_model)
    check_state_matches({k: v.shape for k, v in current.items()}, state, "received adapter")
    # set_peft_model_state_dict copies into the live parameters, casting to their dtype.
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    set_peft_model_state_dict(peft_model, tensors)


def state_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 of an adapter's float32 values, names and shapes (key order does not matter): how
    the central site and every silo compare the initial adapter each derived from the run's seed."""
    h = hashlib.sha256()
    for key in sorted(state):
        v = np.ascontiguousarray(state[key], dtype=np.float32)
        h.update(f"{key}\0{v.shape}\0".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def to_array_record(state: dict[str, np.ndarray]) -> Any:
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for k, v in state.items():
        # Adapter tensors travel as float32 whatever the model's dtype; the wire codec's packed
        # integer arrays (silotune/wire_codec.py) keep their own dtype.
        dtype = None if np.asarray(v).dtype.kind in "ui" else np.float32
        rec[k] = Array(np.ascontiguousarray(v, dtype=dtype))
    return rec


def from_array_record(rec: Any) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, rec[k].numpy()) for k in rec.keys())


def save_adapter_dir(directory: Path, state: dict[str, np.ndarray], peft_config: dict[str, Any]) -> None:
    """Write a directory that ``PeftModel.from_pretrained(base, directory)`` loads.

    Not atomic by itself: callers write into a temporary directory and rename it (checkpoints.py).
    """
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(directory / ADAPTER_CONFIG, peft_config)
    _fsync_file(directory / ADAPTER_WEIGHTS)


def load_adapter_dir(directory: Path) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    from safetensors.numpy import load_file

    cfg = json.loads((directory / ADAPTER_CONFIG).read_text())
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    return OrderedDict(sorted(state.items())), cfg


def peft_config_dict(peft_model: Any) -> dict[str, Any]:
    """The adapter_config.json content of a live PEFT model (JSON-safe)."""
    cfg = peft_model.peft_config["default"].to_dict()
    return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
