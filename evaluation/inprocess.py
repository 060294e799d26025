"""Isolated, federated and centralized PEFT training in one process, for ``silotune compare``.

The federated loop runs the deployed round's own core (``superlink/app/round_core.py``: ``plan_round``
for sampling, each silo's payload and its wire form; ``aggregate_round`` for quorum, weight caps,
clipping, robust selection and the strategy's average) and the silo's own training
(``silo_node.app.training.train_round`` with ``round_seed``); only the transport differs: silos are
called directly instead of over Flower. Adapters travel through the run's wire codec
(``transport.dtype``), and bytes are what ``ArrayRecord.count_bytes()`` reports for them, as in a real
federation; ``fp32_bytes`` is the same traffic in fp32.
Replies come from this process's own training, so the deployment's reply checks are not re-run.

Every approach is trained in the same *phases*: R phases, phase r at ``lr_for_round(train, r, R)``
with a fresh AdamW (what a federated round does), or, with ``train.keep-optimizer-state``, with the
AdamW state each silo (or the central site) kept from its previous phase, as a deployed silo keeps it
in its state dir. Isolated and centralized training therefore differ from federated training only in
what happens between phases (nothing, versus aggregation), and in the data each phase draws from.
See ``compare.py`` for the step-count rule.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from silo_node.app.optimizer_state import OptimizerState
from silo_node.app.training import Encoded, round_seed, train_round
from silotune import protocol as p
from silotune.adapters import adapter_state, attach_adapter, load_adapter_state
from silotune.config import PeftSettings, RunConfig, TrainSettings, lr_for_round
from silotune.wire_codec import ErrorFeedback, decode_uplink, encode_uplink, float32_nbytes, payload_nbytes
from superlink.app.defences import Defence
from superlink.app.defences.central_dp import CentralDP
from superlink.app.round_core import aggregate_round, plan_round, run_encoding
from superlink.app.strategies import SiloUpdate, get_strategy

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Silo:
    """One silo's share of the data, already tokenized for training."""

    name: str
    examples: list[Encoded]
    rank: int  # LoRA rank this silo trains at (FlexLoRA: its own; otherwise peft.rank)


@dataclass
class TrainOutcome:
    """A trained adapter plus what it cost."""

    name: str
    state: OrderedDict[str, np.ndarray]
    rank: int
    steps_per_silo: int  # optimizer steps each participating silo's compute performed
    total_steps: int  # optimizer steps across everyone
    uplink_bytes: int = 0  # what travelled, in the run's transport.dtype
    downlink_bytes: int = 0
    fp32_bytes: int = 0  # the same traffic as float32 (what transport.dtype=fp32 would have moved)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean train loss per phase

    @property
    def adapter_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes


def silo_seed(base_seed: int, name: str, phase: int) -> int:
    """The ClientApp's per-round seed (``silo_node.app.training.round_seed``), for every approach."""
    return round_seed(base_seed, name, phase)


class AdapterBank:
    """One base model loaded once; one PEFT-wrapped copy per LoRA rank, reused by loading states.

    PEFT wraps the base in place, so each rank gets its own deep copy of the pristine base. The
    freshly initialised state of each rank (seeded) is kept so every training starts from it.
    """

    def __init__(self, base_model: Any, tokenizer: Any, peft: PeftSettings, seed: int) -> None:
        self.base, self.tokenizer, self.peft, self.seed = base_model, tokenizer, peft, seed
        self._models: dict[int, Any] = {}
        self._init: dict[int, OrderedDict[str, np.ndarray]] = {}

    def model(self, rank: int) -> Any:
        if rank not in self._models:
            self._models[rank] = attach_adapter(copy.deepcopy(self.base), self.peft, rank, self.seed)
            self._init[rank] = adapter_state(self._models[rank])
        return self._models[rank]

    def initial_state(self, rank: int) -> OrderedDict[str, np.ndarray]:
        self.model(rank)
        return OrderedDict((k, v.copy()) for k, v in self._init[rank].items())

    def with_state(self, state: dict[str, np.ndarray], rank: int) -> Any:
        """The rank-``rank`` model holding ``state`` (the live object: do not keep two at once)."""
        model = self.model(rank)
        load_adapter_state(model, state)
        return model


def _phase_train(
    bank: AdapterBank,
    state: dict[str, np.ndarray],
    rank: int,
    examples: list[Encoded],
    train: TrainSettings,
    steps: int,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
    kept: dict[str, OptimizerState] | None = None,
    who: str = "",
) -> tuple[OrderedDict[str, np.ndarray], float]:
    """One silo's round (or one phase). ``kept`` (train.keep-optimizer-state): each trainer's AdamW
    state by name, read before and updated after, as the ClientApp keeps it in the silo's state dir."""
    model = bank.with_state(state, rank)
    settings = train.model_copy(update={"local_steps": steps})
    result = train_round(
        model, bank.tokenizer, examples, settings, lr=lr, seed=seed, proximal_mu=proximal_mu,
        optimizer_state=kept.get(who) if kept is not None else None,
    )  # fmt: skip
    if kept is not None and result.optimizer_state is not None:
        kept[who] = result.optimizer_state
    return adapter_state(model), result.train_loss


def _kept_optimizers(train: TrainSettings) -> dict[str, OptimizerState] | None:
    """Where the trainers keep their AdamW state between phases, or None for a fresh one each."""
    return {} if train.keep_optimizer_state else None


def train_isolated(
    bank: AdapterBank, silo: Silo, train: TrainSettings, rounds: int, log: Log = _stderr
) -> TrainOutcome:
    """The silo alone: R phases of local-steps steps on its own data, nothing shared."""
    t0 = time.monotonic()
    state = bank.initial_state(bank.peft.rank)
    losses = []
    kept = _kept_optimizers(train)
    for phase in range(rounds):
        lr = lr_for_round(train, phase, rounds)
        state, loss = _phase_train(
            bank, state, bank.peft.rank, silo.examples, train, train.local_steps, lr,
            silo_seed(train.seed, silo.name, phase + 1), kept=kept, who=silo.name,
        )  # fmt: skip
        losses.append(loss)
        log(f"  isolated {silo.name}: phase {phase + 1}/{rounds} loss {loss:.4f}")
    steps = rounds * train.local_steps
    return TrainOutcome(
        f"isolated-{silo.name}",
        state,
        bank.peft.rank,
        steps,
        steps,
        seconds=time.monotonic() - t0,
        losses=losses,
    )


def pooled_examples(silos: list[Silo], balanced: bool) -> list[Encoded]:
    """The silos' data at one site; ``balanced``: every silo's rows repeated up to the largest
    silo's count, so each silo's data is drawn equally often (what equal silo weights give a
    federation; FinGPT balances its sources the same way, by copies)."""
    if not balanced:
        return [e for s in silos for e in s.examples]
    largest = max(len(s.examples) for s in silos)
    pooled: list[Encoded] = []
    for s in silos:
        pooled += [s.examples[i % len(s.examples)] for i in range(largest)]
    return pooled


def train_centralized(
    bank: AdapterBank,
    silos: list[Silo],
    train: TrainSettings,
    rounds: int,
    log: Log = _stderr,
    balanced: bool = False,
) -> TrainOutcome:
    """All silos' data pooled at one site, with all silos' compute: R phases of N x local-steps."""
    t0 = time.monotonic()
    pooled = pooled_examples(silos, balanced)
    steps_per_phase = train.local_steps * len(silos)
    state = bank.initial_state(bank.peft.rank)
    losses = []
    kept = _kept_optimizers(train)
    for phase in range(rounds):
        lr = lr_for_round(train, phase, rounds)
        state, loss = _phase_train(
            bank, state, bank.peft.rank, pooled, train, steps_per_phase, lr,
            silo_seed(train.seed, "central", phase + 1), kept=kept, who="central",
        )  # fmt: skip
        losses.append(loss)
        log(f"  centralized: phase {phase + 1}/{rounds} loss {loss:.4f}")
    return TrainOutcome(
        "centralized",
        state,
        bank.peft.rank,
        steps_per_phase * rounds // len(silos),
        steps_per_phase * rounds,
        seconds=time.monotonic() - t0,
        losses=losses,
    )


def train_federated(
    bank: AdapterBank,
    silos: list[Silo],
    run: RunConfig,
    rounds: int,
    log: Log = _stderr,
) -> TrainOutcome:
    """R rounds of the deployed round core: sample, payload down, local-steps at each silo, update
    up, defences and aggregation (``superlink/app/round_core.py``), with silos called in-process.

    As in the real federation, the initial global adapter is a freshly initialised one from a silo
    (here the first, at its rank); FlexLoRA re-factors it to every silo's rank. Silo ``i`` plays
    node id ``i``, so sampling draws from the same sorted ids a deployment of as many silos would.
    """
    t0 = time.monotonic()
    run = run.model_copy(update={"num_rounds": rounds})
    strategy = get_strategy(run.strategy, run.peft)
    defence = Defence(run.strategy, run.peft.alpha)
    central = CentralDP.for_run(run.central_dp)  # central-dp.enabled: as the deployed round does it
    global_state: dict[str, np.ndarray] = bank.initial_state(silos[0].rank)
    enc = run_encoding(run)
    # Each silo's quantization residual, as a resident silo keeps it (transport.error-feedback).
    feedback = {s.name: ErrorFeedback() for s in silos} if run.transport.error_feedback else {}
    # Each silo's AdamW state between its rounds (train.keep-optimizer-state), as its state dir keeps it.
    kept = _kept_optimizers(run.train)
    ranks = {i: s.rank for i, s in enumerate(silos)}
    up = down = fp32 = 0
    losses = []
    for server_round in range(1, rounds + 1):
        plan = plan_round(run, strategy, enc, global_state, list(ranks), ranks, server_round)
        updates = []
        for i, downlink in plan.downlinks.items():
            silo = silos[i]
            down += payload_nbytes(downlink.wire)
            state, loss = _phase_train(
                bank, downlink.held, silo.rank, silo.examples, run.train, run.train.local_steps,
                float(plan.config[p.LR]), round_seed(run.train.seed, silo.name, server_round),
                float(plan.config.get(p.PROXIMAL_MU, 0.0)), kept=kept, who=silo.name,
            )  # fmt: skip
            reply = encode_uplink(state, downlink.held, enc, feedback.get(silo.name))
            up += payload_nbytes(reply)
            fp32 += downlink.fp32_bytes + float32_nbytes(state)
            state = decode_uplink(reply, downlink.held, enc)
            updates.append(SiloUpdate(i, state, len(silo.examples), silo.rank, {p.TRAIN_LOSS: loss}))
        agg = aggregate_round(
            run, strategy, defence, global_state, updates, plan.held(), central, len(plan.sampled)
        )
        global_state = agg.global_state
        if agg.train_loss is not None:
            losses.append(agg.train_loss)
        shown = "unchanged (quorum missed)" if agg.train_loss is None else f"{agg.train_loss:.4f}"
        # Which silos the robust aggregator kept: on a clean run, its whole cost.
        used = (
            ""
            if agg.report is None
            else " silos used "
            + " ".join(f"{silos[sc.node_id].name}:{sc.modules_used:.2f}" for sc in agg.report.scores)
        )
        log(f"  {strategy.name}: round {server_round}/{rounds} loss {shown} bytes so far {up + down:,}{used}")
    final, rank = strategy.checkpoint_adapter(global_state)
    steps = rounds * run.train.local_steps
    return TrainOutcome(
        strategy.name,
        OrderedDict(final),
        rank or bank.peft.rank,
        steps,
        steps * len(silos),
        uplink_bytes=up,
        downlink_bytes=down,
        fp32_bytes=fp32,
        seconds=time.monotonic() - t0,
        losses=losses,
    )
