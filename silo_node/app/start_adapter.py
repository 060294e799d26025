"""The adapter a run starts from when it is not the one every silo derives from train.seed.

Why: a silo that trains with differential privacy spends its budget on what its own records add.
Starting from an adapter already trained on public data (the usual DP recipe; docs/privacy.md has
the figures) leaves DP-SGD less to learn than starting from scratch. Issue 23's rule still holds,
though: neither the central site nor one silo may pick the start for the others. So a run names a
start adapter only by its digest (``peft.start-adapter``, silotune.adapters.state_digest), and
each silo

* serves it only if its own policy lists that digest, with the directory it installed it in::

      [[start-adapters]]
      sha256 = "..."                       # `silotune silo start-adapter DIR` prints it
      path = "/srv/silotune/adapters/fpb"  # a PEFT adapter directory (a SiloTune checkpoint)

* loads it from that directory, computes the digest itself and refuses the run if the files no
  longer match (someone changed them after the operator pinned them);
* checks that its names and shapes are the adapter the run configures;
* and, while the global adapter is still the start, trains only if the central site's claimed
  start (INITIAL_SHA256) is this one (client_app._check_start).

A silo at another FlexLoRA rank cannot hold the run's-rank file in its own shapes; it still has to
list the digest (consent), and receives the start from the central site like any global adapter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from silo_node.app.policy import SiloPolicy, start_entry
from silotune.adapters import ADAPTER_WEIGHTS, check_state_matches, load_adapter_dir, state_digest
from silotune.config import RunConfig
from silotune.errors import PolicyRefused

__all__ = ["start_state"]

_LOCK = threading.Lock()
# (path, mtime_ns, size) -> (digest, state): a resident worker hashes the files once, not per round.
_CACHE: dict[tuple[str, int, int], tuple[str, OrderedDict[str, np.ndarray]]] = {}


def _load(path: Path) -> tuple[str, OrderedDict[str, np.ndarray]]:
    weights = path / ADAPTER_WEIGHTS
    try:
        st = weights.stat()
        key = (str(weights.resolve()), st.st_mtime_ns, st.st_size)
        with _LOCK:
            if key in _CACHE:
                return _CACHE[key]
        state, _ = load_adapter_dir(path)
    except Exception as exc:  # missing files, unreadable safetensors or JSON: this run's start only
        raise PolicyRefused(f"the start adapter at {path} cannot be read: {exc}") from exc
    digest = state_digest(state)
    with _LOCK:
        _CACHE.clear()  # one start adapter at a time is what a silo serves
        _CACHE[key] = (digest, state)
    return digest, state


def start_state(
    policy: SiloPolicy, run: RunConfig, rank: int, seeded: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The adapter this silo starts the run from: ``seeded`` (its own, from train.seed) unless the
    run names a start adapter, which is then loaded from the policy's directory and verified.
    Raises PolicyRefused, whose reason stays in this silo's log and audit."""
    entry = start_entry(policy, run)
    if entry is None or rank != run.peft.rank:
        return seeded
    digest, state = _load(Path(entry.path).expanduser())
    if digest != entry.sha256:
        raise PolicyRefused(
            f"the start adapter at {entry.path} has sha256 {digest[:12]}..., but the policy pins "
            f"{entry.sha256[:12]}...: its files changed after they were pinned"
        )
    try:
        check_state_matches({k: v.shape for k, v in seeded.items()}, state, f"start adapter {entry.path}")
    except ValueError as exc:
        raise PolicyRefused(
            f"{exc}: it is not an adapter of this run's peft settings (method, rank, target modules)"
        ) from exc
    return state
