"""The round itself, with no Flower in it: sample, build each silo's payload, aggregate with defences.

A round is ``plan_round`` (who trains, at what learning rate, and what each silo receives), the
transport, then ``aggregate_round``. Two callers run exactly this code, so they cannot drift apart:
- the deployed ServerApp (``superlink/app/rounds.py``), which moves payloads and replies over Flower's
  Grid and adds what only a deployment has (handshakes, timeouts, reply checks, events, resume);
- ``silotune compare``'s in-process federation (``evaluation/inprocess.py``), which calls the silos'
  training directly.

No Flower messaging in it (numpy; central DP uses two of Flower's DP helpers). The silo side of a
round (``silo_node.app.training.train_round`` with ``round_seed``) is likewise one function that
both call.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from silotune import protocol as p
from silotune.config import RunConfig, lr_for_round
from silotune.wire_codec import Encoding, decode, encode, encoding_for, float32_nbytes
from superlink.app.defences import Defence, DefenceReport
from superlink.app.defences.central_dp import CentralDP, release_as_update
from superlink.app.strategies import SiloUpdate, Strategy


def sample_nodes(node_ids: list[int], fraction: float, min_nodes: int, rng: random.Random) -> list[int]:
    """FlowerTune's sampling: a fraction of the connected silos, but at least min-nodes."""
    k = min(len(node_ids), max(min_nodes, math.ceil(fraction * len(node_ids))))
    return sorted(rng.sample(sorted(node_ids), k))


def sample_round(cfg: RunConfig, usable: list[int], server_round: int) -> list[int]:
    """The silos of round ``server_round``: seeded by the run's seed and the round, so a resumed or
    replayed run samples the same silos."""
    rng = random.Random(cfg.train.seed * 7919 + server_round)
    return sample_nodes(usable, cfg.strategy.fraction_train, cfg.strategy.min_nodes, rng)


def train_config(cfg: RunConfig, strategy: Strategy, server_round: int) -> dict[str, float | int]:
    """What every silo is told with its train payload (the model identity is added by the caller)."""
    return {
        p.SERVER_ROUND: server_round,
        p.NUM_ROUNDS: cfg.num_rounds,
        p.LR: lr_for_round(cfg.train, server_round - 1, cfg.num_rounds),
        **strategy.silo_config(),
    }


def build_payloads(
    strategy: Strategy,
    global_state: dict[str, np.ndarray],
    ranks: dict[int, int | None],
    server_round: int,
) -> dict[int, dict[str, np.ndarray]]:
    """Each sampled silo's payload (FlexLoRA: at that silo's rank). Kept by the caller: it is the
    reference each silo's update is measured against."""
    return {nid: strategy.payload_for(global_state, rank, server_round) for nid, rank in ranks.items()}


def run_encoding(cfg: RunConfig) -> Encoding:
    """The run's wire format (``transport.*``), the same at both ends."""
    return encoding_for(cfg.transport)


def encode_downlink(
    payload: dict[str, np.ndarray], enc: Encoding
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the arrays that travel to a silo, the adapter the silo holds once it decodes them).

    The second is the reference the silo's update is measured against: in a quantized format it is
    the dequantized payload, which the server computes exactly as the silo does.
    """
    arrays = encode(payload, enc)
    if not enc.quantized:
        return arrays, payload
    return arrays, decode(arrays, enc, {k: tuple(v.shape) for k, v in payload.items()})


@dataclass
class Downlink:
    """One sampled silo's share of a round: what travels, and what the silo holds once decoded."""

    wire: dict[str, np.ndarray]  # the arrays in the run's transport.dtype
    held: dict[str, np.ndarray]  # the reference the silo's update is rebuilt on and measured against
    fp32_bytes: int  # the same adapter as float32: what transport.dtype=fp32 would have moved


@dataclass
class RoundPlan:
    """Round ``server_round``: the sampled silos, what each is told and what each receives."""

    server_round: int
    sampled: list[int]
    config: dict[str, Any]
    downlinks: dict[int, Downlink]

    def held(self) -> dict[int, dict[str, np.ndarray]]:
        return {nid: d.held for nid, d in self.downlinks.items()}


def plan_round(
    cfg: RunConfig,
    strategy: Strategy,
    enc: Encoding,
    global_state: dict[str, np.ndarray],
    usable: list[int],
    ranks: dict[int, int | None],
    server_round: int,
) -> RoundPlan:
    """Sample among ``usable`` (``ranks``: each silo's LoRA rank), build and encode every payload."""
    sampled = sample_round(cfg, usable, server_round)
    payloads = build_payloads(strategy, global_state, {n: ranks[n] for n in sampled}, server_round)
    downlinks = {}
    for nid, payload in payloads.items():
        wire, held = encode_downlink(payload, enc)
        downlinks[nid] = Downlink(wire, held, float32_nbytes(payload))
    return RoundPlan(server_round, sampled, train_config(cfg, strategy, server_round), downlinks)


@dataclass
class Aggregation:
    """What one round's aggregation produced."""

    global_state: dict[str, np.ndarray]  # unchanged when the quorum was missed
    updated: bool  # False: fewer valid updates than strategy.min-answers, nothing aggregated
    train_loss: float | None  # example-weighted mean of the silos' local losses
    report: DefenceReport | None  # None under central DP, which bypasses the defences
    seconds: float
    # Central DP's figures of the round (protocol.CDP_FIELDS; per-silo CDP_SILO_FIELDS lists), or {}.
    central_dp: dict[str, Any] = field(default_factory=dict)


def aggregate_round(
    cfg: RunConfig,
    strategy: Strategy,
    defence: Defence,
    global_state: dict[str, np.ndarray],
    updates: list[SiloUpdate],
    sent: dict[int, dict[str, np.ndarray]],
    central: CentralDP | None = None,
    num_sampled: int = 0,
) -> Aggregation:
    """Quorum, then caps, scores, robust selection and clipping (``Defence.apply``), then the
    strategy's own average. ``sent[node_id]`` is what that silo received this round.

    Under central DP (``central``, from ``central-dp.enabled``) the defences are bypassed: every
    delta is clipped to central-dp.clipping-norm, the clipped deltas are averaged with equal weights
    over the ``num_sampled`` silos asked, and noised; the strategy takes that release as its one
    update (FedAvg keeps it, FedAvgM/FedAdam step on it: post-processing). Why the weights and the
    robust aggregators cannot stay: superlink/app/defences/central_dp.py."""
    if not updates or len(updates) < cfg.strategy.min_answers:
        return Aggregation(global_state, False, None, None, 0.0)
    t0 = time.monotonic()
    total = sum(u.num_examples for u in updates)
    loss = float(sum(u.metrics[p.TRAIN_LOSS] * u.num_examples for u in updates) / total)
    if central is not None:
        released, figures = central.release(global_state, updates, sent, max(num_sampled, len(updates)))
        new_state = dict(strategy.aggregate(global_state, [release_as_update(released)]))
        return Aggregation(new_state, True, loss, None, time.monotonic() - t0, figures)
    report = defence.apply(updates, [sent[u.node_id] for u in updates])
    new_state = dict(strategy.aggregate(global_state, updates))
    return Aggregation(new_state, True, loss, report, time.monotonic() - t0)
