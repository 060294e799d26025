"""Robust aggregators: which silos' updates each module's average uses (``strategy.aggregator``).

They are layered *under* any strategy rather than beside it: an aggregator only chooses, per module,
the set of silos to average; the strategy (FedAvg, FedAvgM, FedAdam, FlexLoRA) then averages the
chosen silos' factors exactly as it always does, with the capped example weights. So each works
with LoRA as the strategy does, including FlexLoRA's heterogeneous ranks, and each is exact on
identical honest updates: whichever silos it keeps, their average is that one update.

Every decision is taken on the silos' *effective* updates ΔW_i = s·B_i·A_i − s·B_ref·A_ref per module
(superlink/app/defences/), through their Gram matrix G (computed in factored form, never as dense
matrices): ||ΔW_i − ΔW_j||² = G_ii + G_jj − 2·G_ij. None of them forms ΔW. What each computes:

- ``mean``: every silo, every module (the strategy's own average; caps and clipping still apply).
- ``median``: per module, the *medoid*: the one silo whose update has the smallest sum of distances
  to the others' (a geometric median restricted to the submitted updates; in one dimension with
  an odd count it is the coordinate median). The module's new value is that silo's update.
- ``trimmed-mean``: per module, drop the 2f updates farthest from the medoid (f =
  ``strategy.max-byzantine``; in one dimension with symmetric spread these are the f largest and f
  smallest, i.e. the classic trimmed mean), and average the rest. Needs n > 2f, else: the medoid.
- ``multi-krum`` (Blanchard et al. 2017): on the whole update (all modules' Grams summed), each
  silo's score is the sum of squared distances to its n − f − 2 nearest others; the n − f lowest
  scores are averaged.
- ``consensus`` (in the spirit of ROBOSAC, Li et al. 2023): the largest subset of silos whose
  updates are pairwise within ``strategy.consensus-tolerance`` × the round's median update norm
  (a maximum clique, exhaustive up to 16 silos, greedy from the medoid beyond); ties go to the
  subset with the smallest sum of distances. No two silos agreeing: the medoid alone. With fewer
  than 3 updates it keeps them all (a mean): a disagreeing pair does not say which one is wrong,
  and picking either would let that one silo set the round. The default aggregator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from itertools import combinations
from typing import ClassVar

import numpy as np

from silotune.config import StrategySettings

EXHAUSTIVE_CLIQUE_MAX = 16  # 2**16 subsets at most; cross-silo federations are far smaller
CONSENSUS_MIN_SILOS = 3  # below: a mean (two silos cannot outvote each other)


def distances_from_gram(g: np.ndarray) -> np.ndarray:
    """Pairwise Frobenius distances from a Gram matrix (clamped at 0 against rounding)."""
    d = np.diag(g)
    return np.sqrt(np.maximum(d[:, None] + d[None, :] - 2.0 * g, 0.0))


def medoid(dist: np.ndarray) -> int:
    """Index with the smallest sum of distances to the others (ties: the lowest index)."""
    return int(np.argmin(dist.sum(axis=1)))


class Aggregator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def select(self, grams: dict[str, np.ndarray], settings: StrategySettings) -> dict[str, np.ndarray]:
        """Per module, a boolean mask over the silos: which updates the module's average uses."""


class Mean(Aggregator):
    name = "mean"

    def select(self, grams: dict[str, np.ndarray], settings: StrategySettings) -> dict[str, np.ndarray]:
        return {m: np.ones(g.shape[0], dtype=bool) for m, g in grams.items()}


class Median(Aggregator):
    name = "median"

    def select(self, grams: dict[str, np.ndarray], settings: StrategySettings) -> dict[str, np.ndarray]:
        out = {}
        for m, g in grams.items():
            mask = np.zeros(g.shape[0], dtype=bool)
            mask[medoid(distances_from_gram(g))] = True
            out[m] = mask
        return out


class TrimmedMean(Aggregator):
    name = "trimmed-mean"

    def select(self, grams: dict[str, np.ndarray], settings: StrategySettings) -> dict[str, np.ndarray]:
        out = {}
        for m, g in grams.items():
            n = g.shape[0]
            dist = distances_from_gram(g)
            center = medoid(dist)
            keep = n - 2 * settings.max_byzantine
            mask = np.zeros(n, dtype=bool)
            if keep < 1:
                mask[center] = True
            else:
                # Stable sort: the medoid (distance 0) first, ties broken by silo order.
                mask[np.argsort(dist[center], kind="stable")[:keep]] = True
            out[m] = mask
        return out


class MultiKrum(Aggregator):
    name = "multi-krum"

    def select(self, grams: dict[str, np.ndarray], settings: StrategySettings) -> dict[str, np.ndarray]:
        total = sum(grams.values())
        n = total.shape[0]
        f = settings.max_byzantine
        sq = distances_from_gram(total) ** 2
        k = max(1, n - f - 2)
        scores = np.array([np.sort(np.delete(sq[i], i))[:k].sum() if n > 1 else 0.0 for i in range(n)])
        mask = np.zeros(n, dtype=bool)
        mask[np.argsort(scores, kind="stable")[: max(1, n - f)]] = True
        return {m: mask.copy() for m in grams}


class Consensus(Aggregator):
    name = "consensus"

    def select(self, grams: dict[str, np.ndarray], settings: StrategySettings) -> dict[str, np.ndarray]:
        total = sum(grams.values())
        n = total.shape[0]
        if n < CONSENSUS_MIN_SILOS:
            return {m: np.ones(n, dtype=bool) for m in grams}
        dist = distances_from_gram(total)
        norms = np.sqrt(np.maximum(np.diag(total), 0.0))
        tol = settings.consensus_tolerance * float(np.median(norms))
        # A relative slack so that identical updates agree despite rounding in the Gram matrix.
        agree = dist <= tol + 1e-9 * (1.0 + float(norms.max(initial=0.0)))
        best = _largest_clique(agree, dist)
        mask = np.zeros(n, dtype=bool)
        mask[list(best)] = True
        return {m: mask.copy() for m in grams}


def _largest_clique(agree: np.ndarray, dist: np.ndarray) -> tuple[int, ...]:
    n = agree.shape[0]
    if n <= EXHAUSTIVE_CLIQUE_MAX:
        for size in range(n, 1, -1):
            found = [
                c for c in combinations(range(n), size) if all(agree[i, j] for i, j in combinations(c, 2))
            ]
            if found:
                return min(found, key=lambda c: sum(dist[i, j] for i, j in combinations(c, 2)))
        return (medoid(dist),)
    members = [medoid(dist)]
    for j in np.argsort(dist[members[0]], kind="stable"):
        if j not in members and all(agree[j, i] for i in members):
            members.append(int(j))
    return tuple(sorted(members))


AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (Mean, TrimmedMean, Median, MultiKrum, Consensus)
}


def get_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()
    except KeyError:
        raise ValueError(f"strategy.aggregator: unknown {name!r}; known: {', '.join(AGGREGATORS)}") from None
