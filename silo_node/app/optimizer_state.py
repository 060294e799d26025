"""AdamW's state carried from round to round at a silo (``train.keep-optimizer-state``).

Off by default, as in FlowerTune, where every round starts a fresh AdamW. When on, the silo keeps
each adapter parameter's AdamW moments (``exp_avg``, ``exp_avg_sq``) and step count, keyed by the
parameter's name, and the next round's optimizer starts from them. The learning rate is always the
one the server sends for the round (its cosine schedule rules), never the one the state was saved
with. A state that does not fit the adapter (another rank, other target modules) or cannot be read
is ignored with a warning and the round starts a fresh AdamW: it only refines later rounds, and must
never cost the silo a round.

The state never leaves the silo: it is not part of any reply. It lives in the silo's state dir
(``optimizer/run-<id>-adamw.safetensors``, written atomically, mode 0600: moments of gradients say
something about the data) or, for a silo without one, in the resident worker's memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from silotune.atomic_files import atomic_write_bytes

# parameter name -> {"exp_avg": Tensor, "exp_avg_sq": Tensor, "step": 0-d Tensor}, all on the CPU.
OptimizerState = dict[str, dict[str, Any]]
NamedParams = Sequence[tuple[str, Any]]

SLOTS = ("exp_avg", "exp_avg_sq", "step")
FORMAT = "silotune-adamw-1"
_SEP = "#"  # "<parameter name>#<slot>" in the file; PyTorch parameter names never contain it

_log = logging.getLogger(__name__)


def export_state(opt: Any, named: NamedParams) -> OptimizerState:
    """What ``opt`` (an AdamW over ``named``'s parameters) knows, as float32 CPU copies by name.

    A parameter that never had a gradient has no state and is left out; the next round starts it
    fresh, as AdamW would."""
    import torch

    out: OptimizerState = {}
    for name, param in named:
        s = opt.state.get(param) or {}
        if not all(k in s for k in SLOTS):
            continue
        out[name] = {
            "exp_avg": s["exp_avg"].detach().to("cpu", torch.float32).clone(),
            "exp_avg_sq": s["exp_avg_sq"].detach().to("cpu", torch.float32).clone(),
            "step": torch.as_tensor(s["step"], dtype=torch.float32).detach().cpu().reshape(()).clone(),
        }
    return out


def mismatch(state: OptimizerState, named: NamedParams) -> str | None:
    """Why ``state`` cannot start an AdamW over ``named``'s parameters, or None when it can."""
    import torch

    shapes = {name: tuple(p.shape) for name, p in named}
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        return f"{len(unknown)} parameter(s) the adapter does not have, e.g. {unknown[0]}"
    for name, slots in state.items():
        if set(slots) != set(SLOTS):
            return f"{name} holds {sorted(slots)}, expected {list(SLOTS)}"
        for slot in ("exp_avg", "exp_avg_sq"):
            got = tuple(slots[slot].shape)
            if got != shapes[name]:
                return f"{name}.{slot} has shape {got}, the adapter's is {shapes[name]} (another rank?)"
        if slots["step"].numel() != 1:
            return f"{name}.step is not one number"
        step = float(slots["step"].reshape(()))
        if not math.isfinite(step) or step < 1:
            return f"{name}.step is {step}"
        if not bool(torch.isfinite(slots["exp_avg"]).all()):
            return f"{name}.exp_avg holds non-finite values"
        sq = slots["exp_avg_sq"]
        if not bool(torch.isfinite(sq).all()) or bool((sq < 0).any()):
            return f"{name}.exp_avg_sq holds negative or non-finite values"
    return None


def apply_state(opt: Any, named: NamedParams, state: OptimizerState, lr: float) -> bool:
    """Start ``opt`` from ``state`` (by parameter name) at this round's ``lr``; True when it did.

    A state that does not fit is ignored with one warning and ``opt`` stays fresh."""
    if not state:
        return False
    reason = mismatch(state, named)
    if reason is not None:
        _log.warning("ignoring the kept AdamW state (%s); this round starts a fresh optimizer", reason)
        return False
    current = opt.state_dict()
    # Indices follow the order of the parameters in the groups (one group here); load_state_dict
    # casts the moments to each parameter's dtype and device and keeps the step as it is.
    current["state"] = {
        i: {k: v.clone() for k, v in state[name].items()}
        for i, (name, _) in enumerate(named)
        if name in state
    }
    opt.load_state_dict(current)
    for group in opt.param_groups:  # the server's schedule rules, not the saved state's lr
        group["lr"] = lr
    return True


def to_tensors(state: OptimizerState) -> dict[str, Any]:
    """Flat ``{"<name>#<slot>": tensor}`` for safetensors."""
    return {
        f"{name}{_SEP}{slot}": t.contiguous() for name, slots in state.items() for slot, t in slots.items()
    }


def from_tensors(flat: dict[str, Any]) -> OptimizerState:
    """The inverse of :func:`to_tensors`; raises ValueError on a key it does not know."""
    out: OptimizerState = {}
    for key, tensor in flat.items():
        name, sep, slot = key.rpartition(_SEP)
        if not sep or not name or slot not in SLOTS:
            raise ValueError(f"unexpected entry {key!r}")
        out.setdefault(name, {})[slot] = tensor
    return out


class OptimizerStore:
    """Where one silo keeps one run's AdamW state: a file in its state dir, or a dict in memory."""

    _MEMORY_KEY = "adamw"

    def __init__(self, path: Path | None = None, memory: dict[str, Any] | None = None) -> None:
        if (path is None) == (memory is None):
            raise ValueError("an OptimizerStore needs a path or a memory dict, not both")
        self.path = Path(path) if path is not None else None
        self.memory = memory

    def load(self) -> OptimizerState | None:
        """The kept state, or None (none yet, or unreadable: one warning, the round starts fresh)."""
        if self.memory is not None:
            return self.memory.get(self._MEMORY_KEY)
        assert self.path is not None
        if not self.path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as fh:
                fmt = (fh.metadata() or {}).get("format")
                if fmt != FORMAT:
                    raise ValueError(f"format {fmt!r}, expected {FORMAT!r}")
                return from_tensors({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 - not a dict
        except Exception as exc:  # noqa: BLE001 - any unreadable file
            _log.warning(
                "ignoring unreadable optimizer state %s (%s: %s); this round starts a fresh optimizer",
                self.path,
                type(exc).__name__,
                exc,
            )
            return None

    def save(self, state: OptimizerState) -> None:
        """Keep ``state`` for the next round. A file that cannot be written is removed (so the next
        round starts fresh instead of from an older round's state) and the round still counts."""
        if self.memory is not None:
            self.memory[self._MEMORY_KEY] = state
            return
        assert self.path is not None
        from safetensors.torch import save

        try:
            atomic_write_bytes(self.path, save(to_tensors(state), metadata={"format": FORMAT}), mode=0o600)
        except OSError as exc:
            _log.warning(
                "cannot keep the optimizer state in %s (%s); next round starts fresh", self.path, exc
            )
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass


__all__ = [
    "FORMAT",
    "OptimizerState",
    "OptimizerStore",
    "apply_state",
    "export_state",
    "from_tensors",
    "mismatch",
    "to_tensors",
]
