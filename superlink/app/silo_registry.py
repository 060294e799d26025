"""Who is in the run: handshakes, names, pending approvals, refusals, the base model and the start.

- **Handshake.** Every new silo is asked for its base model, rank and data size; silos on another
  base model than most are refused (update_rejected, model_mismatch).
- **Names** come from the admission ledger (silotune/admission_ledger.py), never from what a silo
  claims, except without any ledger (plaintext development).
- **Pending approval** is not a failure: such a silo is asked again every round.
- **Backoff.** A silo whose handshake fails (its data check failed, its ClientApp crashes, it never
  answers) is not refused for good: it may be fixed and come back. Asking it every round would cost
  a whole round timeout per attempt when it does not answer, so after the k-th failure in a row it
  is asked again only after 2**(k-1) rounds (1, 2, 4, ...), at most CAP_ROUNDS rounds later.
- **The initial adapter** is agreed by the silos rather than chosen by one (``agree_initial_adapter``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.supercore import log

from silotune import protocol as p
from silotune.adapters import state_digest
from silotune.admission_ledger import admitted_names
from silotune.config import RunConfig
from silotune.events import EventLog
from silotune.silo_failures import SiloFailure, failure_code
from superlink.app.exchange import Exchange
from superlink.app.reply_checks import ReplyRejected, check_handshake, check_init_reply

# get_node_ids keeps retrying a busy SuperLink at least this long, even at the end of a wait.
GRID_RETRY_MIN_SECONDS = 30.0
CAP_ROUNDS = 8
PENDING = SiloFailure.APPROVAL_PENDING.name


@dataclass
class SiloInfo:
    node_id: int
    name: str = "?"
    rank: int | None = None
    model_sha256: str = ""
    num_examples: int = 0
    num_eval_examples: int = 0
    refused: str = ""  # non-empty: excluded from this run, with the reason


@dataclass
class HandshakeBackoff:
    cap_rounds: int = CAP_ROUNDS
    failures: dict[int, int] = field(default_factory=dict)
    next_round: dict[int, int] = field(default_factory=dict)

    def due(self, node_id: int, server_round: int) -> bool:
        """May this node be asked for its handshake in this round (0 = before the first)?"""
        return server_round >= self.next_round.get(node_id, 0)

    def failed(self, node_id: int, server_round: int) -> int:
        """Record a failure; returns the round in which the node will be asked again."""
        k = self.failures.get(node_id, 0) + 1
        self.failures[node_id] = k
        self.next_round[node_id] = server_round + min(2 ** (k - 1), self.cap_rounds)
        return self.next_round[node_id]

    def succeeded(self, node_id: int) -> None:
        self.failures.pop(node_id, None)
        self.next_round.pop(node_id, None)


@dataclass
class InitialAdapter:
    """The adapter the run starts from, with the hash the silos check before training from it."""

    state: dict[str, np.ndarray]
    peft_config: dict[str, Any]
    sha256: str


class SiloRegistry:
    """The run's silos by node id, and the federation's base model (``reference_sha``)."""

    def __init__(
        self,
        cfg: RunConfig,
        exchange: Exchange,
        events: EventLog,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.exchange, self.events = cfg, exchange, events
        self.sleep, self.clock = sleep, clock
        self.silos: dict[int, SiloInfo] = {}
        self.reference_sha = ""
        self.backoff = HandshakeBackoff()
        # Each node's last handshake failure code, so that "no usable silo" can say why.
        self.handshake_failed: dict[int, str] = {}
        # Silos whose operator has not yet approved this run: asked again every round, not backed off.
        self.pending: set[int] = set()
        self.admitted = admitted_names()  # node id -> admitted name; None: no ledger

    # -- who is there -------------------------------------------------------------------------
    def usable(self, node_ids: list[int]) -> list[int]:
        """The connected silos that handshook and are not refused."""
        return [n for n in node_ids if n in self.silos and not self.silos[n].refused]

    def wait_for_nodes(self, needed: int) -> list[int]:
        """The connected nodes not refused, once ``needed`` are there or strategy.wait-for-nodes passed."""
        deadline = self.clock() + self.cfg.strategy.wait_for_nodes
        while True:
            nodes = self.exchange.node_ids(max(deadline, self.clock() + GRID_RETRY_MIN_SECONDS))
            usable = [n for n in nodes if not self.silos.get(n, SiloInfo(n)).refused]
            if len(usable) >= needed or self.clock() > deadline:
                return usable
            log(INFO, "waiting for silos: %d connected, %d needed", len(usable), needed)
            self.sleep(2.0)

    def until_approved(self, needed: int, server_round: int) -> list[int]:
        """Handshake; while silos hold the run for approval and fewer than ``needed`` are usable,
        ask again (every 5 s) until strategy.wait-for-nodes has passed."""
        deadline = self.clock() + self.cfg.strategy.wait_for_nodes
        while True:
            nodes = self.wait_for_nodes(needed)
            self.handshake(nodes, server_round)
            if len(self.usable(nodes)) >= needed or not self.pending or self.clock() > deadline:
                return nodes
            self.sleep(5.0)

    def no_usable_silo(self, node_ids: list[int], server_round: int) -> RuntimeError:
        """The error that ends a run with nobody to train: why, as far as the central site knows."""
        if any(n in self.handshake_failed for n in node_ids):  # connected, but none answered usably
            return RuntimeError(
                f"round {server_round}: no usable silo among the {len(node_ids)} connected"
                f"{self.handshake_failures()}; check the silos' logs"
            )
        return RuntimeError(
            f"round {server_round}: no usable silo connected within "
            f"{self.cfg.strategy.wait_for_nodes:.0f} s (strategy.wait-for-nodes); "
            "check the silos' logs and admissions"
        )

    def name(self, nid: int, claimed: str = "") -> str:
        """The name a silo was admitted under; ``node-<id>`` if the ledger lacks it. Only without
        any ledger (plaintext development) is the silo's own claim used."""
        if nid in self.silos:
            return self.silos[nid].name
        if self.admitted is None:
            return claimed or f"node-{nid}"
        return self.admitted.get(nid, f"node-{nid}")

    # -- handshake ----------------------------------------------------------------------------
    def handshake(self, node_ids: list[int], server_round: int) -> None:
        """Learn every new silo's base model, rank and data size; refuse mismatched ones."""
        new = [n for n in node_ids if n not in self.silos and self.backoff.due(n, server_round)]
        if not new:
            return
        cfg_rec = ConfigRecord({p.WANT_INIT: False})
        replies, errors = self.exchange.send(
            MessageType.QUERY,
            {n: RecordDict({p.REC_CONFIG: cfg_rec}) for n in new},
            0,
            self.cfg.strategy.round_timeout,
        )
        for nid, reply in replies.items():
            self.pending.discard(nid)
            try:
                hs = check_handshake(reply.content, self.cfg.strategy.max_rank)
            except ReplyRejected as exc:
                # Like a failed handshake: not refused for good, asked again after its backoff.
                again = self.backoff.failed(nid, server_round)
                self.reject(0, nid, exc, "handshake")
                log(WARNING, "silo node %d: handshake asked again in round %d", nid, again)
                continue
            name = self.name(nid, hs.silo)
            self.silos[nid] = SiloInfo(
                nid, name, hs.rank, hs.model_sha256, hs.num_examples, hs.num_eval_examples
            )
            claimed = {"claimed_name": hs.silo} if hs.silo != name else {}
            self.events.emit(
                p.EV_SILO_HANDSHAKE,
                node_id=nid,
                silo=name,
                rank=hs.rank,
                num_examples=hs.num_examples,
                **claimed,
            )
        for nid, reason in sorted(errors.items()):
            if failure_code(reason) == PENDING:
                self.mark_pending(server_round, nid, reason)
                continue
            self.pending.discard(nid)
            # Not refused for good: a silo whose data check failed may be fixed and come back.
            again = self.backoff.failed(nid, server_round)
            self.handshake_failed[nid] = failure_code(reason)
            log(WARNING, "silo node %d failed its handshake: %s (asked again: round %d)", nid, reason, again)
            self.events.emit(
                p.EV_SILO_FAILED,
                round=0,
                node_id=nid,
                silo=self.name(nid),
                code=failure_code(reason),
                reason=f"handshake: {reason}",
                retry_round=again,
            )
        if not self.reference_sha:
            self._choose_reference()
        for nid in new:
            silo = self.silos.get(nid)
            if silo and not silo.refused and silo.model_sha256 != self.reference_sha:
                silo.refused = (
                    f"base model {silo.model_sha256[:12]} differs from the federation's "
                    f"{self.reference_sha[:12]}"
                )
                # Refused for the run, but reported as every other bad reply is.
                self.reject(0, nid, ReplyRejected(p.R_MODEL, silo.refused), "handshake")

    def _choose_reference(self) -> None:
        """The base model most silos run is the federation's (ties: lowest node id)."""
        by_sha: dict[str, list[int]] = {}
        for nid, s in sorted(self.silos.items()):
            by_sha.setdefault(s.model_sha256, []).append(nid)
        if by_sha:
            self.reference_sha = max(by_sha.items(), key=lambda kv: (len(kv[1]), -kv[1][0]))[0]

    def handshake_failures(self) -> str:
        """``": their handshakes failed (a CODE, b CODE)"`` for connected silos that failed theirs."""
        failed = sorted(
            (self.name(n), code) for n, code in self.handshake_failed.items() if n not in self.silos
        )
        if not failed:
            return ""
        return ": their handshakes failed (" + ", ".join(f"{name} {code}" for name, code in failed) + ")"

    # -- failures -----------------------------------------------------------------------------
    def mark_pending(self, server_round: int, nid: int, reason: str) -> None:
        """The silo holds this run for its operator's approval: not a failure, asked again next round."""
        first = nid not in self.pending
        self.pending.add(nid)
        self.events.emit(
            p.EV_SILO_PENDING,
            round=server_round,
            node_id=nid,
            silo=self.name(nid),
            code=PENDING,
            reason=reason,
        )
        if first:
            log(INFO, "silo %s (node %d) holds this run until its operator approves it", self.name(nid), nid)

    def record_failures(self, server_round: int, errors: dict[int, str]) -> None:
        """Silos that did not answer a round's exchange: pending approval, or failed (with the code)."""
        for nid, reason in sorted(errors.items()):
            if failure_code(reason) == PENDING:
                self.mark_pending(server_round, nid, reason)
                continue
            name = self.name(nid)
            self.events.emit(
                p.EV_SILO_FAILED,
                round=server_round,
                node_id=nid,
                silo=name,
                code=failure_code(reason),
                reason=reason,
            )
            log(WARNING, "round %d: silo %s (node %d) failed: %s", server_round, name, nid, reason)

    def reject(self, server_round: int, nid: int, exc: ReplyRejected, phase: str) -> None:
        """A bad reply costs the silo this exchange, never the run: an event and a log line."""
        name = self.name(nid)
        self.events.emit(
            p.EV_UPDATE_REJECTED,
            round=server_round,
            node_id=nid,
            silo=name,
            phase=phase,
            code=exc.code,
            reason=exc.detail,
        )
        log(
            WARNING,
            "round %d: rejected %s reply of silo %s (node %d): %s",
            server_round,
            phase,
            name,
            nid,
            exc,
        )

    # -- the start ----------------------------------------------------------------------------
    def agree_initial_adapter(self) -> InitialAdapter:
        """The run's starting adapter, agreed by the silos rather than chosen by one of them.

        Every silo derives a fresh adapter from the run's seed (train.seed); the central site, which
        needs no model, asks every silo at the run's rank for it, hashes each reply itself and starts
        from the adapter that more silos made than any other. The silos that made another are
        recorded (update_rejected, init_mismatch) and stay in the run: their updates still pass the
        defences. No majority (two silos that disagree, or all different) stops the run before round
        1: any pick would be one silo's. While the global adapter is still that start, each silo is
        told its hash and refuses to train from anything it would not have made itself.

        A run that names its start (``peft.start-adapter``, a published adapter's digest) takes no
        vote: the silos that hold it, each from the files its own policy pins, send it; the others
        are recorded, and no silo that trains starts from anything else (_check_start at the silo).
        """
        live = [n for n, s in sorted(self.silos.items()) if not s.refused]
        # FlexLoRA: a silo at another rank derives another adapter; those at the run's rank vote.
        voters = [n for n in live if self.silos[n].rank == self.cfg.peft.rank] or live
        content = {n: RecordDict({p.REC_CONFIG: ConfigRecord({p.WANT_INIT: True})}) for n in voters}
        replies, errors = self.exchange.send(MessageType.QUERY, content, 0, self.cfg.strategy.round_timeout)
        made: dict[str, list[int]] = {}
        states: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        for nid in voters:
            if nid not in replies:
                log(WARNING, "silo node %d could not provide the initial adapter: %s", nid, errors.get(nid))
                continue
            try:
                state, peft_config = check_init_reply(replies[nid].content)
            except ReplyRejected as exc:
                self.reject(0, nid, exc, "init")
                continue
            digest = state_digest(state)
            made.setdefault(digest, []).append(nid)
            states.setdefault(digest, (dict(state), peft_config))
        if not made:
            failures = self.handshake_failures()
            raise RuntimeError(f"no silo could provide the initial adapter{failures}; check the silos' logs")
        ranked = sorted(made.items(), key=lambda kv: len(kv[1]), reverse=True)
        named = self.cfg.peft.start_adapter
        if named:
            # The run names its start (peft.start-adapter): no vote; every silo that trains has
            # pinned that digest in its policy, and one that sends anything else is recorded.
            if named not in made:
                raise RuntimeError(
                    f"no silo provided the run's start adapter {named[:12]}... (peft.start-adapter): "
                    "each silo must list it under [[start-adapters]] in its policy, with its files"
                )
            ranked = [(named, made[named])] + [kv for kv in ranked if kv[0] != named]
        digest, agreed = ranked[0]
        if not named and len(ranked) > 1 and len(ranked[1][1]) == len(agreed):
            groups = "; ".join(", ".join(self.silos[n].name for n in nids) for _, nids in ranked)
            raise RuntimeError(
                "the silos' initial adapters disagree and no majority made the same one (groups: "
                f"{groups}); every silo derives it from train.seed with its base model, torch and peft: "
                "check that their versions match, or remove the silo that differs"
            )
        for other, nids in ranked[1:]:
            for nid in nids:
                source = "the run's start adapter" if named else "derived from train.seed"
                exc = ReplyRejected(
                    p.R_INIT_MISMATCH,
                    f"its initial adapter (sha256 {other[:12]}) is not the one {len(agreed)} other "
                    f"silo(s) hold, {source} ({digest[:12]})",
                )
                self.reject(0, nid, exc, "init")
        state, peft_config = states[digest]
        peft_config["base_model_name_or_path"] = self.cfg.model.name
        total = sum(map(len, made.values()))
        how = "the run's start adapter, sent" if named else "derived alike"
        log(INFO, "initial adapter %s: %s by %d of %d silos", digest[:12], how, len(agreed), total)
        return InitialAdapter(state, peft_config, digest)
