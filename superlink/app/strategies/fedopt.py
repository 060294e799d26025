"""Server-optimizer strategies: FedAvgM (Hsu et al. 2019) and FedAdam (Reddi et al. 2021, FedOpt).

Both treat the FedAvg result as a step and apply a server optimizer to it. Conventions follow the
papers (and Flower): FedAvgM keeps momentum v <- beta*v + (x - avg), x <- x - lr*v; FedAdam uses
delta = avg - x, m <- b1*m + (1-b1)*delta, v <- b2*v + (1-b2)*delta^2, x <- x + lr*m/(sqrt(v)+tau),
without bias correction, as in the paper.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from superlink.app.strategies.base import SiloUpdate, Strategy, average_updates


class _ServerOptimizer(Strategy):
    _slots: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._state: dict[str, dict[str, np.ndarray]] = {s: {} for s in self._slots}

    def _slot(self, slot: str, key: str, like: np.ndarray) -> np.ndarray:
        return self._state[slot].setdefault(key, np.zeros_like(like, dtype=np.float64))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{slot}/{k}": v for slot, d in self._state.items() for k, v in d.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name, value in state.items():
            slot, key = name.split("/", 1)
            if slot not in self._state:
                raise ValueError(f"strategy {self.name}: unknown state slot {slot!r} in checkpoint")
            self._state[slot][key] = np.asarray(value, dtype=np.float64)


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"
    _slots = ("momentum",)

    def aggregate(self, global_state: dict[str, np.ndarray], updates: list[SiloUpdate]) -> OrderedDict:
        avg = average_updates(updates)
        beta, lr = self.settings.server_momentum, self.settings.server_lr
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k, x in global_state.items():
            pseudo_grad = x.astype(np.float64) - avg[k]
            v = beta * self._slot("momentum", k, x) + pseudo_grad
            self._state["momentum"][k] = v
            out[k] = (x - lr * v).astype(np.float32)
        return out


class FedAdam(_ServerOptimizer):
    name = "fedadam"
    _slots = ("m", "v")

    def aggregate(self, global_state: dict[str, np.ndarray], updates: list[SiloUpdate]) -> OrderedDict:
        avg = average_updates(updates)
        s = self.settings
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k, x in global_state.items():
            delta = avg[k].astype(np.float64) - x
            m = s.beta1 * self._slot("m", k, x) + (1 - s.beta1) * delta
            v = s.beta2 * self._slot("v", k, x) + (1 - s.beta2) * delta * delta
            self._state["m"][k], self._state["v"][k] = m, v
            out[k] = (x + s.server_lr * m / (np.sqrt(v) + s.tau)).astype(np.float32)
        return out
