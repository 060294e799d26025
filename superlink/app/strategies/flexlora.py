"""FlexLoRA (Bai et al. 2024, arXiv 2402.11505): federated LoRA with heterogeneous ranks.

Each silo trains LoRA at its own rank r_i (declared in its node config as lora-rank). Per adapted
module the server forms every silo's full update dW_i = s_i * B_i @ A_i (s_i = alpha / r_i, PEFT's
scaling), averages them weighted by examples, and sends each silo the rank-r_i truncated SVD of the
average, so a small silo gets the best rank-r_i approximation and a large one loses nothing.

We never materialise the dense out x in matrices: sum_i w_i s_i B_i A_i = Bcat @ Acat, and with
QR factorisations Bcat = Qb Rb, Acat^T = Qa Ra the SVD of the average is
Qb svd(Rb Ra^T) Qa^T, which costs O((out + in) * (sum r_i)^2) instead of O(out * in * min(out, in)).

The global adapter is kept in SVD form at rank R = the largest silo rank seen in the round:
B = U S / s_R, A = V^T. Truncating it to r_j <= R is exact in the sense of Eckart-Young, and when
every r_j is at least the rank of the average, every silo receives the average exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from silotune.adapters import A_SUFFIX, B_SUFFIX, lora_modules
from superlink.app.strategies.base import SiloUpdate, Strategy, average_updates


def svd_of_product(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, S, Vt) of b @ a without forming it: b is (out, k), a is (k, in)."""
    qb, rb = np.linalg.qr(b.astype(np.float64))
    qa, ra = np.linalg.qr(a.astype(np.float64).T)
    um, s, vtm = np.linalg.svd(rb @ ra.T)
    return qb @ um, s, vtm @ qa.T


def factors_at_rank(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """LoRA factors (B, A) of rank ``rank`` with scale * B @ A = best rank-``rank`` approximation.

    If fewer than ``rank`` components exist, A gets extra random rows and B zero columns: the
    product is unchanged, and those components can still learn (all-zero rows would never move).
    """
    k = min(rank, s.shape[0])
    b = (u[:, :k] * s[:k]) / scale
    a = vt[:k]
    if k < rank:
        in_dim = vt.shape[1]
        bound = 1.0 / np.sqrt(in_dim)
        a = np.vstack([a, rng.uniform(-bound, bound, size=(rank - k, in_dim))])
        b = np.hstack([b, np.zeros((u.shape[0], rank - k))])
    return b.astype(np.float32), a.astype(np.float32)


class FlexLoRA(Strategy):
    name = "flexlora"

    def _scale(self, rank: int) -> float:
        return float(self.peft.alpha) / float(rank)

    @staticmethod
    def _rank_of(state: dict[str, np.ndarray]) -> int:
        mods = lora_modules(state)
        if not mods:
            raise ValueError("FlexLoRA needs LoRA factors (lora_A / lora_B) in the adapter")
        return int(state[mods[0] + A_SUFFIX].shape[0])

    def payload_for(
        self, global_state: dict[str, np.ndarray], rank: int | None, server_round: int
    ) -> dict[str, np.ndarray]:
        rank = rank or self.peft.rank
        g_rank = self._rank_of(global_state)
        rng = np.random.default_rng(server_round)  # same padding for every silo of a round
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for key, value in global_state.items():
            if not key.endswith((A_SUFFIX, B_SUFFIX)):
                out[key] = value
        for mod in lora_modules(global_state):
            b_g = global_state[mod + B_SUFFIX].astype(np.float64) * self._scale(g_rank)
            u, s, vt = svd_of_product(b_g, global_state[mod + A_SUFFIX])
            b, a = factors_at_rank(u, s, vt, rank, self._scale(rank), rng)
            out[mod + A_SUFFIX], out[mod + B_SUFFIX] = a, b
        return OrderedDict(sorted(out.items()))

    def expected_shapes(
        self, global_state: dict[str, np.ndarray], rank: int | None
    ) -> dict[str, tuple[int, ...]]:
        rank = rank or self.peft.rank
        shapes = {}
        for key, value in global_state.items():
            if key.endswith(A_SUFFIX):
                shapes[key] = (rank, value.shape[1])
            elif key.endswith(B_SUFFIX):
                shapes[key] = (value.shape[0], rank)
            else:
                shapes[key] = tuple(value.shape)
        return shapes

    def aggregate(self, global_state: dict[str, np.ndarray], updates: list[SiloUpdate]) -> OrderedDict:
        ranks = [u.rank or self._rank_of(u.state) for u in updates]
        target = max(ranks)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        others = [k for k in updates[0].state if not k.endswith((A_SUFFIX, B_SUFFIX))]
        if others:  # e.g. a trained bias: plain FedAvg
            out.update(average_updates(updates, others))
        rng = np.random.default_rng(0)
        for mod in lora_modules(updates[0].state):
            # Capped weights and robust per-module selection (superlink/app/defences/) live here.
            weights = np.array([u.weight_for(mod + A_SUFFIX) for u in updates], dtype=np.float64)
            weights /= weights.sum()
            b_cat = np.hstack(
                [
                    w * self._scale(r) * u.state[mod + B_SUFFIX].astype(np.float64)
                    for u, w, r in zip(updates, weights, ranks, strict=True)
                ]
            )
            a_cat = np.vstack([u.state[mod + A_SUFFIX].astype(np.float64) for u in updates])
            u_, s, vt = svd_of_product(b_cat, a_cat)
            b, a = factors_at_rank(u_, s, vt, target, self._scale(target), rng)
            out[mod + A_SUFFIX], out[mod + B_SUFFIX] = a, b
        return OrderedDict(sorted(out.items()))

    def checkpoint_adapter(self, global_state: dict[str, np.ndarray]) -> tuple[dict, int | None]:
        return global_state, self._rank_of(global_state)
