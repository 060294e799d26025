"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).

FedProx changes only the silo's objective (a proximal term mu/2 * ||w - w_global||^2); the server
aggregates exactly as FedAvg, so mu = 0 *is* FedAvg.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from silotune import protocol as p
from superlink.app.strategies.base import SiloUpdate, Strategy, average_updates


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, global_state: dict[str, np.ndarray], updates: list[SiloUpdate]) -> OrderedDict:
        return average_updates(updates)


class FedProx(FedAvg):
    name = "fedprox"

    def silo_config(self) -> dict[str, float]:
        return {p.PROXIMAL_MU: float(self.settings.proximal_mu)}
