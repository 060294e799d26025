"""Aggregation strategies, selected by name (``strategy.name`` in the run config).

To add one: subclass superlink.app.strategies.base.Strategy in a small module and list it here.
Robust aggregators (``strategy.aggregator``: which silos each module's average uses) are the
defences' registry, in superlink/app/defences/aggregators.py; any strategy runs under any of them.
"""

from __future__ import annotations

from silotune.config import PeftSettings, StrategySettings
from superlink.app.strategies.base import SiloUpdate, Strategy, weighted_average
from superlink.app.strategies.fedavg import FedAvg, FedProx
from superlink.app.strategies.fedopt import FedAdam, FedAvgM
from superlink.app.strategies.flexlora import FlexLoRA

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FlexLoRA)}


def get_strategy(settings: StrategySettings, peft: PeftSettings) -> Strategy:
    try:
        cls = REGISTRY[settings.name]
    except KeyError:
        raise ValueError(
            f"strategy.name: unknown strategy {settings.name!r}; known: {', '.join(REGISTRY)}"
        ) from None
    return cls(settings, peft)


__all__ = [
    "REGISTRY",
    "SiloUpdate",
    "Strategy",
    "get_strategy",
    "weighted_average",
]
