"""The shape every aggregation strategy shares. Strategies are pure numpy: no Flower, no torch.

A strategy sees the current global adapter state and the silos' updates, and returns the next
global state. It may keep server state (momentum, Adam moments) that checkpoints persist, and it
decides what each silo receives (FlexLoRA sends every silo factors at that silo's own rank).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from silotune.config import PeftSettings, StrategySettings


@dataclass
class SiloUpdate:
    """One silo's reply in a round."""

    node_id: int
    state: dict[str, np.ndarray]
    num_examples: int
    rank: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Aggregation weight after the defences' caps (superlink/app/defences/); None: num_examples.
    weight: float | None = None
    # Per state key, the weight that key's average uses, set by the defences after robust
    # selection and capping (0: this silo is left out of that key; the keys of one LoRA module
    # always share it). A key missing here falls back to ``weight``.
    key_weights: dict[str, float] = field(default_factory=dict)

    def weight_for(self, key: str) -> float:
        if key in self.key_weights:
            return float(self.key_weights[key])
        return float(self.num_examples if self.weight is None else self.weight)


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> OrderedDict:
    """Per-key average weighted by ``weights`` (FedAvg by number of examples), in float64."""
    if not states:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[key].astype(np.float64) * (w / total)
        out[key] = acc.astype(np.float32)
    return out


def average_updates(updates: list[SiloUpdate], keys: list[str] | None = None) -> OrderedDict:
    """FedAvg of ``updates`` honouring each one's capped weight and per-key robust selection.

    With no defences applied (weight None, key_weights empty) this is ``weighted_average`` by
    examples, bit for bit: the per-key weights are then the same list for every key.
    """
    if not updates:
        raise ValueError("nothing to average")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key in keys if keys is not None else list(updates[0].state):
        weights = [u.weight_for(key) for u in updates]
        out.update(weighted_average([{key: u.state[key]} for u in updates], weights))
    return out


class Strategy(ABC):
    """Base class. Subclasses set ``name`` and implement ``aggregate``."""

    name: ClassVar[str]

    def __init__(self, settings: StrategySettings, peft: PeftSettings) -> None:
        self.settings = settings
        self.peft = peft

    def silo_config(self) -> dict[str, float]:
        """Extra settings sent to every silo with the train message (FedProx sends its mu)."""
        return {}

    def payload_for(
        self, global_state: dict[str, np.ndarray], rank: int | None, server_round: int
    ) -> dict[str, np.ndarray]:
        """What a silo receives. Default: the global adapter, the same for everyone."""
        return global_state

    def expected_shapes(
        self, global_state: dict[str, np.ndarray], rank: int | None
    ) -> dict[str, tuple[int, ...]]:
        """Shapes a silo's reply must have (used to refuse malformed updates)."""
        return {k: tuple(v.shape) for k, v in global_state.items()}

    @abstractmethod
    def aggregate(self, global_state: dict[str, np.ndarray], updates: list[SiloUpdate]) -> OrderedDict:
        """Return the next global adapter state."""

    def checkpoint_adapter(self, global_state: dict[str, np.ndarray]) -> tuple[dict, int | None]:
        """The adapter to save for PEFT (state, rank if it differs from peft.rank)."""
        return global_state, None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-side optimizer state to checkpoint (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"strategy {self.name} keeps no state, but the checkpoint has some")
