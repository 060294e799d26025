"""The federation's round loop: handshake, sample, send, validate, aggregate, checkpoint.

Written directly on Flower's Grid (Message API) rather than on ``flwr.serverapp.strategy``: FlexLoRA
sends every silo a different payload, every update is validated before it is averaged, a
per-round timeout drops slow silos, and every round is checkpointed atomically for resume.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from silotune import protocol as p
from silotune.adapters import state_digest, to_array_record
from silotune.admission_ledger import admitted_names
from silotune.config import RunConfig, flatten_run_config
from silotune.events import EventLog
from silotune.metrics import BYTES_PER_MB
from silotune.protocol import PROGRESS_PREFIX  # `silotune run` parses these lines
from silotune.silo_failures import SiloFailure, describe_error, failure_code
from silotune.wire_codec import encode, float32_nbytes
from superlink.app.checkpoints import CheckpointStore
from superlink.app.defences import Defence, DefenceReport
from superlink.app.grid_calls import GridCalls, GridUnavailable
from superlink.app.handshake_backoff import HandshakeBackoff
from superlink.app.reply_checks import (
    ReplyRejected,
    check_eval_reply,
    check_handshake,
    check_init_reply,
    check_train_reply,
)
from superlink.app.round_core import (
    aggregate_round,
    build_payloads,
    encode_downlink,
    run_encoding,
    sample_round,
    train_config,
)
from superlink.app.run_lock import RunLock
from superlink.app.strategies import SiloUpdate, Strategy, get_strategy
from superlink.app.watchdog import MAX_CONSECUTIVE_STALLS, RoundStalled, Watchdog, progress_timeout

# get_node_ids keeps retrying a busy SuperLink at least this long, even at the end of a wait.
GRID_RETRY_MIN_SECONDS = 30.0

# Config keys whose change makes an old checkpoint meaningless for this run.
RESUME_MUST_MATCH = (
    "model.name",
    "peft.method",
    "peft.rank",
    "peft.alpha",
    "peft.target-modules",
    "strategy.name",
    "domain",
)


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
class RoundOutcome:
    round: int
    sampled: list[int]
    answered: int
    failed: int
    train_loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    duration_seconds: float
    aggregation_seconds: float
    checkpoint: str = ""
    per_silo: list[dict[str, Any]] = field(default_factory=list)


def _array_bytes(content: Any) -> int:
    """Bytes of a reply's adapter tensors, whatever else the reply holds (0 if none)."""
    try:
        rec = content[p.REC_ARRAYS] if p.REC_ARRAYS in content else None
    except Exception:  # noqa: BLE001 - a malformed reply is counted as 0 and rejected later
        return 0
    return int(rec.count_bytes()) if isinstance(rec, ArrayRecord) else 0


def _finite_or_none(x: float) -> float | None:
    """Events are JSON: an infinite ratio (a silo moving where the others stand still) is null."""
    return x if math.isfinite(x) else None


PENDING = SiloFailure.APPROVAL_PENDING.name


# How often the ServerApp asks the SuperLink for replies while a round is out: a loopback call,
# cheap; every second cost a round half a second on average (benchmarks/round_overhead.py).
REPLY_POLL_SECONDS = 0.25


class Federation:
    """Runs one federated job on a Grid (``sleep`` is injectable for tests)."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_dir: Path,
        run_id: str = "",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        self.run_id = run_id  # a string: Flower's uint64 run ids lose precision as floats
        self.events = EventLog("server", [run_dir / "events.jsonl"])
        self.store = CheckpointStore(run_dir)
        self.strategy: Strategy = get_strategy(cfg.strategy, cfg.peft)
        self.silos: dict[int, SiloInfo] = {}
        self.reference_sha = ""
        self.peft_config: dict[str, Any] = {}
        self.global_state: dict[str, np.ndarray] = {}
        # The agreed initial adapter's hash while the global adapter is still that start; "" after
        # the first aggregation (or on resume): silos check it before training (INITIAL_SHA256).
        self.initial_sha256 = ""
        self.cumulative_bytes = 0
        self.sleep, self.clock = sleep, clock  # injectable: tests run hour-long waits in no time
        self.grid_calls = GridCalls(sleep, clock)
        self.watchdog = Watchdog(cfg.strategy.watchdog_factor, cfg.strategy.round_timeout, clock)
        self.backoff = HandshakeBackoff()
        # Each node's last handshake failure code, so that "no usable silo" can say why.
        self.handshake_failed: dict[int, str] = {}
        # Silos whose operator has not yet approved this run: asked again every round, not backed off.
        self.pending: set[int] = set()
        self.admitted = admitted_names()  # node id -> admitted name; None: no ledger
        # Bounded influence (superlink/app/defences/) and each silo's run of flagged rounds.
        self.defence = Defence(cfg.strategy, cfg.peft.alpha)
        self.encoding = run_encoding(cfg)  # transport.dtype, the same at every silo
        self.anomaly_streak: dict[int, int] = {}
        self.current_round = 0  # 0 = the run's start; handshake backoff counts in rounds
        self.rounds_completed = 0  # last round that produced a new global adapter (run_end)
        self.reply_seconds: dict[int, float] = {}  # node -> push-to-reply seconds, last exchange
        self._reply_node: dict[str, int] = {}  # message id -> silo node, last exchange

    # -- messages -------------------------------------------------------------------------
    def _send(
        self, kind: str, contents: dict[int, RecordDict], server_round: int, timeout: float
    ) -> tuple[dict[int, Message], dict[int, str]]:
        messages = [
            Message(content=c, dst_node_id=nid, message_type=kind, group_id=str(server_round))
            for nid, c in contents.items()
        ]
        replies: dict[int, Message] = {}
        errors: dict[int, str] = {}
        pulled, missing = self._push_and_pull(messages, timeout)
        for reply in pulled:
            # An error reply the SuperLink makes itself (the silo went offline) comes from node 1,
            # Flower's SUPERLINK_NODE_ID: the message it answers names the silo.
            nid = self._reply_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                # Only a code and a fixed text are recorded: the silo's wording stays at the silo.
                errors[nid] = describe_error(reply.error.code, reply.error.reason)
            else:
                replies[nid] = reply
        for nid in contents:
            if nid not in replies and nid not in errors:
                errors[nid] = missing or f"no reply within {timeout:.0f} s (strategy.round-timeout)"
        return replies, errors

    def _push_and_pull(self, messages: list[Message], timeout: float) -> tuple[list[Message], str]:
        """Push, then pull replies until all came or ``timeout`` passed. Every Grid call is retried on
        transient SuperLink errors (e.g. its SQLite state busy: HTTP 500 "database is locked") until
        that deadline (grid_calls.py), and the watchdog may end the wait (RoundStalled), so no wait
        here is unbounded. Returns the replies and, if the SuperLink itself failed, why the rest
        are missing ("" when they simply did not answer in time)."""
        if not messages:
            return [], ""
        deadline = self.clock() + timeout
        # Handshakes are not watched: a silent new silo must not fail the round (see watchdog.py).
        watched = messages[0].metadata.message_type != MessageType.QUERY
        check = self.watchdog.check if watched else None
        self.watchdog.progress()  # a new exchange starts: the server moved on
        self.reply_seconds = {}
        try:
            ids = list(
                self.grid_calls.call(
                    "push_messages", lambda: self.grid.push_messages(messages), deadline, check
                )
            )
        except GridUnavailable as exc:
            return [], str(exc)
        pushed_at = self.clock()
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=False) if mid}
        self._reply_node = dict(node_of)  # message id -> silo, for _send
        pending = set(node_of)
        rnd = int(messages[0].metadata.group_id or 0)
        phase = messages[0].metadata.message_type
        got: list[Message] = []

        def take(batch: list[Message]) -> None:
            for reply in batch:
                mid = reply.metadata.reply_to_message_id
                pending.discard(mid)
                nid = node_of.get(mid, reply.metadata.src_node_id)
                self.reply_seconds[nid] = seconds = self.clock() - pushed_at
                # One line per reply: the exporter's progress signal while a round is under way.
                self.events.emit(p.EV_SILO_REPLY, round=rnd, node_id=nid, phase=phase, reply_seconds=seconds)
            got.extend(batch)
            if batch:
                self.watchdog.progress()

        while pending and self.clock() < deadline:
            try:
                take(self._pull(pending, deadline, check))
            except GridUnavailable as exc:
                return got, str(exc)
            except RoundStalled as exc:  # while retrying a busy SuperLink
                if got:
                    return got, str(exc)
                raise
            if not pending:
                break
            late = self.watchdog.overdue() if watched else ""
            if late or self.clock() >= deadline:
                # A pull can block far past the deadline: Flower's Grid waits for every object of
                # a reply whose sender died mid-upload (minutes, until the SuperLink gives up on
                # it). Replies that arrived meanwhile are collected before the rest are given up.
                try:
                    take(self._pull(pending, self.clock() + REPLY_POLL_SECONDS))
                except GridUnavailable:
                    pass  # the SuperLink failed it: the rest are given up as they would have been
                if not pending:
                    break
            if late and not got:
                raise RoundStalled(late)  # nothing at all came back: the round has failed
            if late:
                return got, late  # the rest are dropped; the round goes on with what came
            if self.clock() < deadline:
                self.sleep(REPLY_POLL_SECONDS)
        return got, ""

    def _pull(
        self, pending: set[str], deadline: float, check: Callable[[], None] | None = None
    ) -> list[Message]:
        """The replies to ``pending`` that have come, retried on transient errors until ``deadline``."""
        return list(
            self.grid_calls.call("pull_messages", lambda: self.grid.pull_messages(pending), deadline, check)
        )

    def _wait_for_nodes(self, needed: int) -> list[int]:
        deadline = self.clock() + self.cfg.strategy.wait_for_nodes
        while True:
            nodes = self.grid_calls.call(
                "get_node_ids",
                lambda: sorted(self.grid.get_node_ids()),
                max(deadline, self.clock() + GRID_RETRY_MIN_SECONDS),
            )
            usable = [n for n in nodes if not self.silos.get(n, SiloInfo(n)).refused]
            if len(usable) >= needed or self.clock() > deadline:
                return usable
            log(INFO, "waiting for silos: %d connected, %d needed", len(usable), needed)
            self.sleep(2.0)

    # -- handshake ----------------------------------------------------------------------------
    def handshake(self, node_ids: list[int]) -> None:
        """Learn every new silo's base model, rank and data size; refuse mismatched ones."""
        # A silo whose handshake failed is asked again only after its backoff (handshake_backoff.py).
        new = [n for n in node_ids if n not in self.silos and self.backoff.due(n, self.current_round)]
        if not new:
            return
        cfg_rec = ConfigRecord({p.WANT_INIT: False})
        replies, errors = self._send(
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
                again = self.backoff.failed(nid, self.current_round)
                self._reject(0, nid, self.silo_name(nid), exc, "handshake")
                log(WARNING, "silo node %d: handshake asked again in round %d", nid, again)
                continue
            name = self.silo_name(nid, hs.silo)
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
                self._pending(self.current_round, nid, reason)
                continue
            self.pending.discard(nid)
            # Not refused for good: a silo whose data check failed may be fixed and come back.
            again = self.backoff.failed(nid, self.current_round)
            self.handshake_failed[nid] = failure_code(reason)
            log(WARNING, "silo node %d failed its handshake: %s (asked again: round %d)", nid, reason, again)
            self.events.emit(
                p.EV_SILO_FAILED,
                round=0,
                node_id=nid,
                silo=self.silo_name(nid),
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
                log(WARNING, "refusing silo %s (node %d): %s", silo.name, nid, silo.refused)
                self.events.emit(
                    p.EV_UPDATE_REJECTED,
                    round=0,
                    node_id=nid,
                    silo=silo.name,
                    phase="handshake",
                    code=p.R_MODEL,
                    reason=silo.refused,
                )

    def silo_name(self, nid: int, claimed: str = "") -> str:
        """The name a silo was admitted under; ``node-<id>`` if the ledger lacks it. Only without
        any ledger (plaintext development) is the silo's own claim used."""
        if nid in self.silos:
            return self.silos[nid].name
        if self.admitted is None:
            return claimed or f"node-{nid}"
        return self.admitted.get(nid, f"node-{nid}")

    def _pending(self, rnd: int, nid: int, reason: str) -> None:
        """The silo holds this run for its operator's approval: not a failure, asked again next round."""
        first = nid not in self.pending
        self.pending.add(nid)
        self.events.emit(
            p.EV_SILO_PENDING, round=rnd, node_id=nid, silo=self.silo_name(nid), code=PENDING, reason=reason
        )
        if first:
            name = self.silo_name(nid)
            log(INFO, "silo %s (node %d) holds this run until its operator approves it", name, nid)

    def _handshake_until_approved(self, needed: int) -> list[int]:
        """Handshake; while silos hold the run for approval and fewer than ``needed`` are usable,
        ask again (every 5 s) until strategy.wait-for-nodes has passed."""
        deadline = self.clock() + self.cfg.strategy.wait_for_nodes
        while True:
            nodes = self._wait_for_nodes(needed)
            self.handshake(nodes)
            usable = [n for n in nodes if n in self.silos and not self.silos[n].refused]
            if len(usable) >= needed or not self.pending or self.clock() > deadline:
                return nodes
            self.sleep(5.0)

    def _choose_reference(self) -> None:
        """The base model most silos run is the federation's (ties: lowest node id)."""
        by_sha: dict[str, list[int]] = {}
        for nid, s in sorted(self.silos.items()):
            by_sha.setdefault(s.model_sha256, []).append(nid)
        if by_sha:
            self.reference_sha = max(by_sha.items(), key=lambda kv: (len(kv[1]), -kv[1][0]))[0]

    def _initial_adapter(self) -> None:
        """The run's starting adapter, agreed by the silos rather than chosen by one of them.

        Every silo derives a fresh adapter from the run's seed (train.seed); the central site, which
        needs no model, asks every silo at the run's rank for it, hashes each reply itself and starts
        from the adapter that more silos made than any other. The silos that made another are
        recorded (update_rejected, init_mismatch) and stay in the run: their updates still pass the
        defences. No majority (two silos that disagree, or all different) stops the run before round
        1: any pick would be one silo's. While the global adapter is still that start, each silo is
        told its hash and refuses to train from anything it would not have made itself.
        """
        live = [n for n, s in sorted(self.silos.items()) if not s.refused]
        # FlexLoRA: a silo at another rank derives another adapter; those at the run's rank vote.
        voters = [n for n in live if self.silos[n].rank == self.cfg.peft.rank] or live
        content = {n: RecordDict({p.REC_CONFIG: ConfigRecord({p.WANT_INIT: True})}) for n in voters}
        replies, errors = self._send(MessageType.QUERY, content, 0, self.cfg.strategy.round_timeout)
        made: dict[str, list[int]] = {}
        states: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        for nid in voters:
            if nid not in replies:
                log(WARNING, "silo node %d could not provide the initial adapter: %s", nid, errors.get(nid))
                continue
            try:
                state, peft_config = check_init_reply(replies[nid].content)
            except ReplyRejected as exc:
                self._reject(0, nid, self.silos[nid].name, exc, "init")
                continue
            digest = state_digest(state)
            made.setdefault(digest, []).append(nid)
            states.setdefault(digest, (dict(state), peft_config))
        if not made:
            failures = self._handshake_failures()
            raise RuntimeError(f"no silo could provide the initial adapter{failures}; check the silos' logs")
        ranked = sorted(made.items(), key=lambda kv: len(kv[1]), reverse=True)
        digest, agreed = ranked[0]
        if len(ranked) > 1 and len(ranked[1][1]) == len(agreed):
            groups = "; ".join(", ".join(self.silos[n].name for n in nids) for _, nids in ranked)
            raise RuntimeError(
                "the silos' initial adapters disagree and no majority made the same one (groups: "
                f"{groups}); every silo derives it from train.seed with its base model, torch and peft: "
                "check that their versions match, or remove the silo that differs"
            )
        for other, nids in ranked[1:]:
            for nid in nids:
                exc = ReplyRejected(
                    p.R_INIT_MISMATCH,
                    f"its initial adapter (sha256 {other[:12]}) is not the one {len(agreed)} other "
                    f"silo(s) derived from train.seed ({digest[:12]})",
                )
                self._reject(0, nid, self.silos[nid].name, exc, "init")
        state, self.peft_config = states[digest]
        self.global_state = state
        self.initial_sha256 = digest
        self.peft_config["base_model_name_or_path"] = self.cfg.model.name
        log(
            INFO,
            "initial adapter %s: derived alike by %d of %d silos",
            digest[:12],
            len(agreed),
            sum(map(len, made.values())),
        )

    def _handshake_failures(self) -> str:
        """``": their handshakes failed (a CODE, b CODE)"`` for connected silos that failed theirs."""
        failed = sorted(
            (self.silo_name(n), code) for n, code in self.handshake_failed.items() if n not in self.silos
        )
        if not failed:
            return ""
        return ": their handshakes failed (" + ", ".join(f"{name} {code}" for name, code in failed) + ")"

    # -- resume -------------------------------------------------------------------------------
    def _resume(self) -> int:
        if not self.cfg.resume:
            return 0
        ckpt = self.store.latest()
        if ckpt is None:
            return 0
        old = ckpt.manifest.get("run_config", {})
        new = flatten_run_config(self.cfg)
        changed = [k for k in RESUME_MUST_MATCH if k in old and old[k] != new.get(k)]
        if changed:
            diffs = ", ".join(f"{k} was {old[k]!r}, now {new.get(k)!r}" for k in changed)
            raise RuntimeError(
                f"cannot resume from {ckpt.path}: {diffs}. "
                "Use a new run-dir, or set resume=false to start over."
            )
        self.global_state = dict(ckpt.adapter)
        self.peft_config = ckpt.peft_config
        self.strategy.load_state_dict(ckpt.strategy_state)
        self.reference_sha = ckpt.manifest.get("base_model", {}).get("sha256", "")
        self.cumulative_bytes = int(ckpt.manifest.get("cumulative_bytes", 0))
        log(INFO, "resuming from %s (round %d)", ckpt.path, ckpt.round)
        return ckpt.round

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """The whole job. Holds the run-dir lock throughout; whatever ends the run, its run_end event
        says how (status, reason) and how many rounds were completed."""
        with RunLock(self.run_dir, self.run_id):  # refused before any event: the holder's log stays clean
            try:
                return self._run()
            except BaseException as exc:
                self.events.emit(
                    p.EV_RUN_END,
                    status=p.RUN_FAILED if isinstance(exc, Exception) else p.RUN_STOPPED,
                    rounds_completed=self.rounds_completed,
                    reason=f"{type(exc).__name__}: {exc}",
                    adapter_dir=str(self.run_dir / "adapter") if self.rounds_completed else "",
                )
                raise

    def _run(self) -> Path | None:
        cfg = self.cfg
        start_round = self._resume()
        self.rounds_completed = self.current_round = start_round
        self._handshake_until_approved(cfg.strategy.min_nodes)
        if not self.global_state:
            self._initial_adapter()
        self.events.emit(
            p.EV_RUN_START,
            num_rounds=cfg.num_rounds,
            start_round=start_round + 1,
            strategy=cfg.strategy.name,
            peft_method=cfg.peft.method,
            comm_budget_bytes=int(cfg.comm_budget_mb * BYTES_PER_MB),
            run_id=self.run_id,
            base_model={"name": cfg.model.name, "sha256": self.reference_sha},
            adapter_parameters=int(sum(v.size for v in self.global_state.values())),
            progress_timeout_seconds=self._progress_timeout(),
        )
        last_ckpt: Path | None = None
        status, reason = p.RUN_COMPLETED, ""
        stalls = 0
        for rnd in range(start_round + 1, cfg.num_rounds + 1):
            try:
                outcome = self.run_round(rnd)
            except RoundStalled as exc:
                stalls += 1
                log(WARNING, "round %d failed: %s", rnd, exc)
                self.events.emit(p.EV_ROUND_STALLED, round=rnd, reason=str(exc))
                if stalls >= MAX_CONSECUTIVE_STALLS:
                    status, reason = p.RUN_STALLED, f"{stalls} rounds in a row made no progress; last: {exc}"
                    log(WARNING, "ending the run: %s", reason)
                    break
                continue
            stalls = 0
            # Completed = produced (and checkpointed) a new global adapter; a round nobody answered did not.
            self.rounds_completed = rnd if outcome.checkpoint else self.rounds_completed
            last_ckpt = Path(outcome.checkpoint) if outcome.checkpoint else last_ckpt
            budget = cfg.comm_budget_mb * BYTES_PER_MB
            if budget and self.cumulative_bytes > budget:
                log(
                    WARNING,
                    "communication budget exceeded (%.1f MB > %.1f MB): stopping",
                    self.cumulative_bytes / BYTES_PER_MB,
                    cfg.comm_budget_mb,
                )
                status = p.RUN_BUDGET_EXCEEDED
                break
        self.events.emit(
            p.EV_RUN_END,
            status=status,
            rounds_completed=self.rounds_completed,
            adapter_dir=str(self.run_dir / "adapter"),
            **({"reason": reason} if reason else {}),
        )
        return last_ckpt

    def _progress_timeout(self) -> float:
        return progress_timeout(self.cfg.strategy.wait_for_nodes, self.cfg.strategy.round_timeout)

    def run_round(self, rnd: int) -> RoundOutcome:
        cfg = self.cfg
        t0 = self.clock()
        self.current_round = rnd
        nodes = self._wait_for_nodes(cfg.strategy.min_nodes)
        self.watchdog.progress()  # the watchdog watches the round's exchanges, not the wait for silos
        self.handshake(nodes)
        usable = [n for n in nodes if n in self.silos and not self.silos[n].refused]
        if not usable:
            if any(n in self.handshake_failed for n in nodes):  # connected, but none answered usably
                raise RuntimeError(
                    f"round {rnd}: no usable silo among the {len(nodes)} connected"
                    f"{self._handshake_failures()}; check the silos' logs"
                )
            raise RuntimeError(
                f"round {rnd}: no usable silo connected within {cfg.strategy.wait_for_nodes:.0f} s "
                "(strategy.wait-for-nodes); check the silos' logs and admissions"
            )
        sampled = sample_round(cfg, usable, rnd)
        self.events.emit(
            p.EV_ROUND_START,
            round=rnd,
            connected=len(nodes),
            sampled=sampled,
            progress_timeout_seconds=self._progress_timeout(),
        )
        base_cfg = {
            **train_config(cfg, self.strategy, rnd),
            p.MODEL_SHA256: self.reference_sha,
            p.MODEL_NAME: cfg.model.name,
            **({p.INITIAL_SHA256: self.initial_sha256} if self.initial_sha256 else {}),
        }
        # What each silo receives; also the reference its update is measured against (defences.py).
        sent = build_payloads(self.strategy, self.global_state, {n: self.silos[n].rank for n in sampled}, rnd)
        # In a quantized transport.dtype, what a silo holds after decoding is the dequantized
        # payload: that is the reference its update is rebuilt on and measured against.
        contents, down, held, fp32 = {}, {}, {}, {}
        for nid, payload in sent.items():
            wire, held[nid] = encode_downlink(payload, self.encoding)
            arrays = to_array_record(wire)
            down[nid] = arrays.count_bytes()
            fp32[nid] = float32_nbytes(payload)
            contents[nid] = RecordDict({p.REC_ARRAYS: arrays, p.REC_CONFIG: ConfigRecord(base_cfg)})
        replies, errors = self._send(MessageType.TRAIN, contents, rnd, cfg.strategy.round_timeout)
        updates, per_silo, uplink = [], [], 0
        for nid, reason in sorted(errors.items()):
            if failure_code(reason) == PENDING:
                self._pending(rnd, nid, reason)
                continue
            self.events.emit(
                p.EV_SILO_FAILED,
                round=rnd,
                node_id=nid,
                silo=self.silos[nid].name,
                code=failure_code(reason),
                reason=reason,
            )
            log(WARNING, "round %d: silo %s (node %d) failed: %s", rnd, self.silos[nid].name, nid, reason)
        for nid, reply in sorted(replies.items()):
            silo = self.silos[nid]
            up = _array_bytes(reply.content)
            uplink += up
            try:
                update = self._validate(nid, reply, rnd, held[nid])
            except ReplyRejected as exc:
                self._reject(rnd, nid, silo.name, exc, "train")
                continue
            updates.append(update)
            m = update.metrics
            row = {
                "round": rnd,
                "node_id": nid,
                p.SILO: silo.name,
                "uplink_bytes": up,
                "downlink_bytes": down[nid],
                # The same adapter as float32 each way: what transport.dtype=fp32 would have moved.
                "uplink_fp32_bytes": fp32[nid],
                "downlink_fp32_bytes": fp32[nid],
                "train_loss": m.get(p.TRAIN_LOSS),
                "examples": update.num_examples,
                p.TOKENS: m.get(p.TOKENS),
                "tokens_per_second": m.get(p.TOKENS_PER_SECOND),
                "train_seconds": m.get(p.TRAIN_SECONDS),
                "lora_rank": update.rank,
                "reply_seconds": self.reply_seconds.get(nid),  # push to reply: slow silos show here
                **{field: m.get(p.metric_key(field)) for field in p.MEMORY_FIELDS},
                # A silo with [privacy] in its policy: the epsilon it has spent, its budget.
                **{f: m[p.metric_key(f)] for f in p.DP_FIELDS if p.metric_key(f) in m},
            }
            per_silo.append(row)
            self.events.emit(p.EV_SILO_RESULT, **row)
        downlink = sum(down.values())
        self.cumulative_bytes += uplink + downlink
        ckpt_path = ""
        agg = aggregate_round(cfg, self.strategy, self.defence, self.global_state, updates, held)
        agg_seconds, loss, quorum = agg.seconds, agg.train_loss, len(updates) >= cfg.strategy.min_answers
        if updates and not quorum:
            log(
                WARNING,
                "round %d: %d valid update(s), fewer than strategy.min-answers=%d; "
                "the global adapter is unchanged",
                rnd,
                len(updates),
                cfg.strategy.min_answers,
            )
            self.events.emit(
                p.EV_QUORUM_MISSED,
                round=rnd,
                valid_updates=len(updates),
                min_answers=cfg.strategy.min_answers,
            )
        elif agg.updated and agg.report is not None and loss is not None:
            self._report_anomalies(rnd, agg.report)
            self.global_state = agg.global_state
            self.initial_sha256 = ""
            ckpt_path = str(self._checkpoint(rnd, loss, per_silo))
        else:
            log(WARNING, "round %d: no valid update; the global adapter is unchanged", rnd)
        self._evaluate(rnd, sampled)
        outcome = RoundOutcome(
            rnd,
            sampled,
            len(updates),
            len(sampled) - len(updates),
            loss,
            uplink,
            downlink,
            self.clock() - t0,
            agg_seconds,
            ckpt_path,
            per_silo,
        )
        if outcome.answered:
            self.watchdog.round_completed(outcome.duration_seconds)
        self.events.emit(
            p.EV_ROUND_END,
            round=rnd,
            duration_seconds=outcome.duration_seconds,
            aggregation_seconds=agg_seconds,
            sampled=len(sampled),
            answered=outcome.answered,
            failed=outcome.failed,
            uplink_bytes=uplink,
            downlink_bytes=downlink,
            fp32_bytes=sum(fp32[n] for n in replies) + sum(fp32.values()),
            cumulative_bytes=self.cumulative_bytes,
            train_loss=loss,
            checkpoint=ckpt_path,
            # The quorum (strategy.min-answers): when missed, the global adapter stayed as it was.
            quorum_met=quorum,
            adapter_updated=bool(ckpt_path),
        )
        log(
            INFO,
            PROGRESS_PREFIX
            + json.dumps(
                {
                    "round": rnd,
                    "num_rounds": self.cfg.num_rounds,
                    "sampled": len(sampled),
                    "answered": outcome.answered,
                    "train_loss": loss,
                    "uplink_bytes": uplink,
                    "downlink_bytes": downlink,
                    "checkpoint": ckpt_path,
                }
            ),
        )
        return outcome

    def _validate(self, nid: int, reply: Message, rnd: int, held: dict[str, np.ndarray]) -> SiloUpdate:
        """Every field checked in superlink/app/reply_checks.py; raises ReplyRejected(code, detail).

        The example count is bounded by the one the silo declared at its handshake, so a silo
        cannot grow its weight mid-run."""
        silo = self.silos[nid]
        checked = check_train_reply(
            reply.content,
            self.strategy.expected_shapes(self.global_state, silo.rank),
            self.reference_sha,
            silo.num_examples,
            silo.rank,
            sent=held,
            enc=self.encoding,
        )
        return SiloUpdate(nid, dict(checked.state), checked.num_examples, silo.rank, checked.metrics)

    def _reject(self, rnd: int, nid: int, name: str, exc: ReplyRejected, phase: str) -> None:
        """A bad reply costs the silo this exchange, never the run: an event and a log line."""
        self.events.emit(
            p.EV_UPDATE_REJECTED,
            round=rnd,
            node_id=nid,
            silo=name,
            phase=phase,
            code=exc.code,
            reason=exc.detail,
        )
        log(WARNING, "round %d: rejected %s reply of silo %s (node %d): %s", rnd, phase, name, nid, exc)

    def _report_anomalies(self, rnd: int, report: DefenceReport) -> None:
        """One anomaly_score event per silo; a silo flagged in strategy.anomaly-rounds consecutive
        rounds is excluded from the rest of the run, with the reason in an event and the log."""
        k = self.cfg.strategy.anomaly_rounds
        for sc in report.scores:
            silo = self.silos[sc.node_id]
            streak = self.anomaly_streak.get(sc.node_id, 0) + 1 if sc.flagged else 0
            self.anomaly_streak[sc.node_id] = streak
            self.events.emit(
                p.EV_ANOMALY,
                round=rnd,
                node_id=sc.node_id,
                silo=silo.name,
                norm=_finite_or_none(sc.norm),
                norm_ratio=_finite_or_none(sc.norm_ratio),
                distance=_finite_or_none(sc.distance),
                cosine=_finite_or_none(sc.cosine),
                flagged=sc.flagged,
                streak=streak,
                weight_share=sc.weight_share,
                clip_factor=sc.clip_factor,
                modules_used=sc.modules_used,
                aggregator=report.aggregator,
            )
            if sc.flagged:
                log(
                    WARNING,
                    "round %d: silo %s flagged as anomalous (%s; %d consecutive round(s))",
                    rnd,
                    silo.name,
                    sc.figures(),
                    streak,
                )
            if k and streak >= k and not silo.refused:
                st = self.cfg.strategy
                silo.refused = (
                    f"update anomalous in {streak} consecutive rounds ({sc.figures()}; "
                    f"strategy.anomaly-threshold={st.anomaly_threshold:g}, "
                    f"strategy.anomaly-min-cosine={st.anomaly_min_cosine:g})"
                )
                log(WARNING, "excluding silo %s (node %d): %s", silo.name, sc.node_id, silo.refused)
                self.events.emit(
                    p.EV_SILO_EXCLUDED,
                    round=rnd,
                    node_id=sc.node_id,
                    silo=silo.name,
                    code=p.R_ANOMALY_EXCLUDED,
                    reason=silo.refused,
                )

    def _checkpoint(self, rnd: int, loss: float, per_silo: list[dict[str, Any]]) -> Path:
        adapter, rank = self.strategy.checkpoint_adapter(self.global_state)
        peft_config = dict(self.peft_config)
        if rank is not None and "r" in peft_config:
            peft_config["r"] = rank
        manifest = {
            "run_config": flatten_run_config(self.cfg),
            "base_model": {"name": self.cfg.model.name, "sha256": self.reference_sha},
            p.REC_METRICS: {"train_loss": loss, "silos": per_silo},
            "cumulative_bytes": self.cumulative_bytes,
            "saved_at": time.time(),
        }
        return self.store.save(rnd, adapter, peft_config, self.strategy.state_dict(), manifest)

    def _evaluate(self, rnd: int, sampled: list[int]) -> None:
        """Federated evaluation on the silos' held-out slices (silos with eval-fraction > 0)."""
        targets = [n for n in sampled if self.silos[n].num_eval_examples > 0]
        if not targets:
            return
        cfg = ConfigRecord(
            {p.SERVER_ROUND: rnd, p.MODEL_SHA256: self.reference_sha, p.MODEL_NAME: self.cfg.model.name}
        )
        ranks = {n: self.silos[n].rank for n in targets}
        payloads = build_payloads(self.strategy, self.global_state, ranks, rnd)
        contents = {
            n: RecordDict({p.REC_ARRAYS: to_array_record(encode(payload, self.encoding)), p.REC_CONFIG: cfg})
            for n, payload in payloads.items()
        }
        replies, _ = self._send(MessageType.EVALUATE, contents, rnd, self.cfg.strategy.round_timeout)
        pairs = []
        for nid, r in sorted(replies.items()):
            try:
                checked = check_eval_reply(r.content, self.silos[nid].num_eval_examples)
            except ReplyRejected as exc:
                self._reject(rnd, nid, self.silos[nid].name, exc, "evaluate")
                continue
            pairs.append((checked.loss, checked.num_examples))
        if pairs:
            total = sum(n for _, n in pairs)
            loss = sum(v * n for v, n in pairs) / total
            self.events.emit(p.EV_EVALUATION, round=rnd, metrics={"eval_loss": loss, "examples": total})
