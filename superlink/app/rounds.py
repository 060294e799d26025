"""The federation's round loop: sample, send, validate, aggregate, checkpoint, evaluate.

Written directly on Flower's Grid (Message API) rather than on ``flwr.serverapp.strategy``: FlexLoRA
sends every silo a different payload, every update is validated before it is averaged, a
per-round timeout drops slow silos, and every round is checkpointed atomically for resume.

One round, file by file (docs/architecture.md): this loop; ``round_core.py`` (who trains and what
each receives, then the defences and the strategy's average); ``exchange.py`` (the messages over the
Grid); ``silo_registry.py`` (who is in the run); ``reply_checks.py`` (every field of a reply);
``checkpoints.py`` (the saved round).
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
from silotune.adapters import to_array_record
from silotune.config import RunConfig, flatten_run_config
from silotune.events import EventLog
from silotune.metrics import BYTES_PER_MB
from silotune.wire_codec import encode
from superlink.app.checkpoints import CheckpointStore
from superlink.app.defences import Defence, DefenceReport
from superlink.app.defences.central_dp import CentralDP
from superlink.app.exchange import Exchange
from superlink.app.reply_checks import ReplyRejected, check_eval_reply, check_train_reply
from superlink.app.round_core import (
    Aggregation,
    RoundPlan,
    aggregate_round,
    build_payloads,
    plan_round,
    run_encoding,
)
from superlink.app.run_lock import RunLock
from superlink.app.silo_registry import SiloInfo, SiloRegistry
from superlink.app.strategies import SiloUpdate, Strategy, get_strategy
from superlink.app.watchdog import MAX_CONSECUTIVE_STALLS, RoundStalled, Watchdog, progress_timeout

# Config keys whose change makes an old checkpoint meaningless for this run.
RESUME_MUST_MATCH = (
    "model.name",
    "peft.method",
    "peft.rank",
    "peft.alpha",
    "peft.target-modules",
    "strategy.name",
    "domain",
    # Rounds released without central DP were not private: a run cannot switch it on (or off) midway.
    "central-dp.enabled",
)


@dataclass
class RoundOutcome:
    server_round: int
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
    central_dp: dict[str, Any] = field(default_factory=dict)  # the round's CDP_FIELDS (central DP only)


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


class Federation:
    """Runs one federated job on a Grid (``sleep`` and ``clock`` are injectable for tests)."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_dir: Path,
        run_id: str = "",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.run_id = run_id  # a string: Flower's uint64 run ids lose precision as floats
        self.clock = clock
        self.events = EventLog("server", [run_dir / "events.jsonl"])
        self.store = CheckpointStore(run_dir)
        self.strategy: Strategy = get_strategy(cfg.strategy, cfg.peft)
        self.watchdog = Watchdog(cfg.strategy.watchdog_factor, cfg.strategy.round_timeout, clock)
        self.exchange = Exchange(grid, self.events, self.watchdog, sleep, clock)
        self.registry = SiloRegistry(cfg, self.exchange, self.events, sleep, clock)
        self.peft_config: dict[str, Any] = {}
        self.global_state: dict[str, np.ndarray] = {}
        # The agreed initial adapter's hash while the global adapter is still that start; "" after
        # the first aggregation (or on resume): silos check it before training (INITIAL_SHA256).
        self.initial_sha256 = ""
        self.cumulative_bytes = 0
        # Bounded influence (superlink/app/defences/) and each silo's run of flagged rounds.
        self.defence = Defence(cfg.strategy, cfg.peft.alpha)
        # central-dp.enabled: clipping and noise on the aggregate, with the run's own accountant.
        self.central = CentralDP.for_run(cfg.central_dp)
        self.encoding = run_encoding(cfg)  # transport.dtype, the same at every silo
        self.anomaly_streak: dict[int, int] = {}
        self.rounds_completed = 0  # last round that produced a new global adapter (run_end)

    @property
    def silos(self) -> dict[int, SiloInfo]:
        return self.registry.silos

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
        self.registry.reference_sha = ckpt.manifest.get("base_model", {}).get("sha256", "")
        self.cumulative_bytes = int(ckpt.manifest.get("cumulative_bytes", 0))
        self.central = CentralDP.for_run(self.cfg.central_dp, ckpt.manifest.get(p.CDP_MANIFEST_KEY))
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
        self.rounds_completed = start_round
        self.registry.until_approved(cfg.strategy.min_nodes, start_round)
        if not self.global_state:
            start = self.registry.agree_initial_adapter()
            self.global_state, self.peft_config, self.initial_sha256 = (
                start.state,
                start.peft_config,
                start.sha256,
            )
        self.events.emit(
            p.EV_RUN_START,
            num_rounds=cfg.num_rounds,
            start_round=start_round + 1,
            strategy=cfg.strategy.name,
            peft_method=cfg.peft.method,
            comm_budget_bytes=int(cfg.comm_budget_mb * BYTES_PER_MB),
            run_id=self.run_id,
            base_model={"name": cfg.model.name, "sha256": self.registry.reference_sha},
            adapter_parameters=int(sum(v.size for v in self.global_state.values())),
            # The start the silos check (from train.seed, or peft.start-adapter); absent on resume.
            **({"initial_sha256": self.initial_sha256} if self.initial_sha256 else {}),
            progress_timeout_seconds=self._progress_timeout(),
        )
        last_ckpt: Path | None = None
        status, reason = p.RUN_COMPLETED, ""
        stalls = 0
        for server_round in range(start_round + 1, cfg.num_rounds + 1):
            spent = self.central.refusal() if self.central is not None else None
            if spent:
                status, reason = p.RUN_DP_BUDGET_EXHAUSTED, spent
                log(WARNING, "ending the run before round %d: %s", server_round, reason)
                break
            try:
                outcome = self.run_round(server_round)
            except RoundStalled as exc:
                stalls += 1
                log(WARNING, "round %d failed: %s", server_round, exc)
                self.events.emit(p.EV_ROUND_STALLED, round=server_round, reason=str(exc))
                if stalls >= MAX_CONSECUTIVE_STALLS:
                    status, reason = p.RUN_STALLED, f"{stalls} rounds in a row made no progress; last: {exc}"
                    log(WARNING, "ending the run: %s", reason)
                    break
                continue
            stalls = 0
            # Completed = produced (and checkpointed) a new global adapter; a round nobody answered did not.
            self.rounds_completed = server_round if outcome.checkpoint else self.rounds_completed
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

    def run_round(self, server_round: int) -> RoundOutcome:
        """One round: the silos, the plan, the exchange, the checks, the aggregate, the record."""
        cfg, t0 = self.cfg, self.clock()
        nodes = self.registry.wait_for_nodes(cfg.strategy.min_nodes)
        self.watchdog.progress()  # the watchdog watches the round's exchanges, not the wait for silos
        self.registry.handshake(nodes, server_round)
        usable = self.registry.usable(nodes)
        if not usable:
            raise self.registry.no_usable_silo(nodes, server_round)
        ranks = {n: self.silos[n].rank for n in usable}
        plan = plan_round(cfg, self.strategy, self.encoding, self.global_state, usable, ranks, server_round)
        self.events.emit(
            p.EV_ROUND_START,
            round=server_round,
            connected=len(nodes),
            sampled=plan.sampled,
            progress_timeout_seconds=self._progress_timeout(),
        )
        contents, down = self._train_messages(plan)
        replies, errors = self.exchange.send(
            MessageType.TRAIN, contents, server_round, cfg.strategy.round_timeout
        )
        self.registry.record_failures(server_round, errors)
        updates, per_silo, uplink = self._collect(plan, replies, down)
        self.cumulative_bytes += uplink + sum(down.values())
        agg = aggregate_round(
            cfg, self.strategy, self.defence, self.global_state, updates, plan.held(), self.central,
            len(plan.sampled),
        )  # fmt: skip
        checkpoint = self._adopt(server_round, agg, len(updates), per_silo)
        self._evaluate(server_round, plan.sampled)
        outcome = RoundOutcome(
            server_round, plan.sampled, len(updates), len(plan.sampled) - len(updates), agg.train_loss,
            uplink, sum(down.values()), self.clock() - t0, agg.seconds, checkpoint, per_silo,
            {k: v for k, v in agg.central_dp.items() if k in p.CDP_FIELDS},
        )  # fmt: skip
        if outcome.answered:
            self.watchdog.round_completed(outcome.duration_seconds)
        fp32 = sum(d.fp32_bytes for n, d in plan.downlinks.items() if n in replies)
        fp32 += sum(d.fp32_bytes for d in plan.downlinks.values())
        self._record_round(outcome, fp32, quorum_met=len(updates) >= cfg.strategy.min_answers)
        return outcome

    def _train_messages(self, plan: RoundPlan) -> tuple[dict[int, RecordDict], dict[int, int]]:
        """Each sampled silo's train message, and its bytes on the wire."""
        config = ConfigRecord(
            {
                **plan.config,
                p.MODEL_SHA256: self.registry.reference_sha,
                p.MODEL_NAME: self.cfg.model.name,
                **({p.INITIAL_SHA256: self.initial_sha256} if self.initial_sha256 else {}),
            }
        )
        contents, down = {}, {}
        for nid, downlink in plan.downlinks.items():
            arrays = to_array_record(downlink.wire)
            down[nid] = arrays.count_bytes()
            contents[nid] = RecordDict({p.REC_ARRAYS: arrays, p.REC_CONFIG: config})
        return contents, down

    def _collect(
        self, plan: RoundPlan, replies: dict[int, Message], down: dict[int, int]
    ) -> tuple[list[SiloUpdate], list[dict[str, Any]], int]:
        """(the valid updates, one silo_result row per valid update, the uplink bytes of every reply)."""
        updates, per_silo, uplink = [], [], 0
        for nid, reply in sorted(replies.items()):
            up = _array_bytes(reply.content)
            uplink += up
            try:
                update = self._validate(nid, reply, plan.downlinks[nid].held)
            except ReplyRejected as exc:
                self.registry.reject(plan.server_round, nid, exc, "train")
                continue
            updates.append(update)
            m = update.metrics
            row = {
                p.F_ROUND: plan.server_round,
                p.F_NODE_ID: nid,
                p.SILO: self.silos[nid].name,
                p.F_UPLINK_BYTES: up,
                p.F_DOWNLINK_BYTES: down[nid],
                # The same adapter as float32 each way: what transport.dtype=fp32 would have moved.
                p.F_UPLINK_FP32_BYTES: plan.downlinks[nid].fp32_bytes,
                p.F_DOWNLINK_FP32_BYTES: plan.downlinks[nid].fp32_bytes,
                p.F_TRAIN_LOSS: m.get(p.TRAIN_LOSS),
                p.F_EXAMPLES: update.num_examples,
                p.TOKENS: m.get(p.TOKENS),
                p.F_TOKENS_PER_SECOND: m.get(p.TOKENS_PER_SECOND),
                p.F_TRAIN_SECONDS: m.get(p.TRAIN_SECONDS),
                p.F_LORA_RANK: update.rank,
                p.F_REPLY_SECONDS: self.exchange.reply_seconds.get(
                    nid
                ),  # push to reply: slow silos show here
                **{f: m.get(p.metric_key(f)) for f in p.MEMORY_FIELDS},
                # A silo with [privacy] in its policy: the epsilon it has spent, its budget.
                **{f: m[p.metric_key(f)] for f in p.DP_FIELDS if p.metric_key(f) in m},
            }
            per_silo.append(row)
            self.events.emit(p.EV_SILO_RESULT, **row)
        return updates, per_silo, uplink

    def _adopt(self, server_round: int, agg: Aggregation, valid: int, per_silo: list[dict[str, Any]]) -> str:
        """The aggregate becomes the global adapter and is checkpointed; returns the checkpoint ("": none)."""
        if valid and not agg.updated:
            log(
                WARNING,
                "round %d: %d valid update(s), fewer than strategy.min-answers=%d; "
                "the global adapter is unchanged",
                server_round,
                valid,
                self.cfg.strategy.min_answers,
            )
            self.events.emit(
                p.EV_QUORUM_MISSED,
                round=server_round,
                valid_updates=valid,
                min_answers=self.cfg.strategy.min_answers,
            )
            return ""
        if not agg.updated or agg.train_loss is None:
            log(WARNING, "round %d: no valid update; the global adapter is unchanged", server_round)
            return ""
        if agg.report is not None:  # None under central DP, which bypasses the defences
            self._report_anomalies(server_round, agg.report)
        if agg.central_dp:
            # Raw, not noised: for the central site's own log only (never an event or a metric), so
            # that an operator can choose central-dp.clipping-norm from real delta norms.
            norms = zip(
                per_silo, agg.central_dp[p.CDP_UPDATE_NORM], agg.central_dp[p.CDP_CLIP_FACTOR], strict=True
            )
            log(
                INFO,
                "round %d: central DP delta norms before clipping: %s",
                server_round,
                ", ".join(f"{row[p.SILO]} {norm:.4g} (x{factor:.3g})" for row, norm, factor in norms),
            )
        self.global_state = agg.global_state
        self.initial_sha256 = ""
        return str(self._checkpoint(server_round, agg.train_loss, per_silo))

    def _record_round(self, outcome: RoundOutcome, fp32_bytes: int, quorum_met: bool) -> None:
        """The round_end event, and the same figures as the SILOTUNE-ROUND line `silotune run` follows."""
        summary = {
            p.F_ROUND: outcome.server_round,
            p.F_SAMPLED: len(outcome.sampled),
            p.F_ANSWERED: outcome.answered,
            p.F_TRAIN_LOSS: outcome.train_loss,
            p.F_UPLINK_BYTES: outcome.uplink_bytes,
            p.F_DOWNLINK_BYTES: outcome.downlink_bytes,
            p.F_CHECKPOINT: outcome.checkpoint,
        }
        self.events.emit(
            p.EV_ROUND_END,
            **summary,
            duration_seconds=outcome.duration_seconds,
            aggregation_seconds=outcome.aggregation_seconds,
            failed=outcome.failed,
            fp32_bytes=fp32_bytes,
            cumulative_bytes=self.cumulative_bytes,
            # The quorum (strategy.min-answers): when missed, the global adapter stayed as it was.
            quorum_met=quorum_met,
            adapter_updated=bool(outcome.checkpoint),
            **outcome.central_dp,  # central DP: the noise, the clipped count and the run's epsilon
        )
        log(INFO, p.PROGRESS_PREFIX + json.dumps({**summary, p.F_NUM_ROUNDS: self.cfg.num_rounds}))

    def _validate(self, nid: int, reply: Message, held: dict[str, np.ndarray]) -> SiloUpdate:
        """Every field checked in superlink/app/reply_checks.py; raises ReplyRejected(code, detail).

        The example count is bounded by the one the silo declared at its handshake, so a silo
        cannot grow its weight mid-run."""
        silo = self.silos[nid]
        checked = check_train_reply(
            reply.content,
            self.strategy.expected_shapes(self.global_state, silo.rank),
            self.registry.reference_sha,
            silo.num_examples,
            silo.rank,
            sent=held,
            enc=self.encoding,
        )
        return SiloUpdate(nid, dict(checked.state), checked.num_examples, silo.rank, checked.metrics)

    def _report_anomalies(self, server_round: int, report: DefenceReport) -> None:
        """One anomaly_score event per silo; a silo flagged in strategy.anomaly-rounds consecutive
        rounds is excluded from the rest of the run, with the reason in an event and the log."""
        k = self.cfg.strategy.anomaly_rounds
        for sc in report.scores:
            silo = self.silos[sc.node_id]
            streak = self.anomaly_streak.get(sc.node_id, 0) + 1 if sc.flagged else 0
            self.anomaly_streak[sc.node_id] = streak
            self.events.emit(
                p.EV_ANOMALY,
                round=server_round,
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
                    server_round,
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
                    round=server_round,
                    node_id=sc.node_id,
                    silo=silo.name,
                    code=p.R_ANOMALY_EXCLUDED,
                    reason=silo.refused,
                )

    def _checkpoint(self, server_round: int, loss: float, per_silo: list[dict[str, Any]]) -> Path:
        adapter, rank = self.strategy.checkpoint_adapter(self.global_state)
        peft_config = dict(self.peft_config)
        if rank is not None and "r" in peft_config:
            peft_config["r"] = rank
        manifest = {
            "run_config": flatten_run_config(self.cfg),
            "base_model": {"name": self.cfg.model.name, "sha256": self.registry.reference_sha},
            p.REC_METRICS: {p.F_TRAIN_LOSS: loss, "silos": per_silo},
            "cumulative_bytes": self.cumulative_bytes,
            "saved_at": time.time(),
            # The central accountant's history, so a resumed run keeps the epsilon it has spent.
            **({p.CDP_MANIFEST_KEY: self.central.accountant.to_dict()} if self.central is not None else {}),
        }
        return self.store.save(server_round, adapter, peft_config, self.strategy.state_dict(), manifest)

    def _evaluate(self, server_round: int, sampled: list[int]) -> None:
        """Federated evaluation on the silos' held-out slices (silos with eval-fraction > 0)."""
        targets = [n for n in sampled if self.silos[n].num_eval_examples > 0]
        if not targets:
            return
        cfg = ConfigRecord(
            {
                p.SERVER_ROUND: server_round,
                p.MODEL_SHA256: self.registry.reference_sha,
                p.MODEL_NAME: self.cfg.model.name,
            }
        )
        ranks = {n: self.silos[n].rank for n in targets}
        payloads = build_payloads(self.strategy, self.global_state, ranks, server_round)
        contents = {
            n: RecordDict({p.REC_ARRAYS: to_array_record(encode(payload, self.encoding)), p.REC_CONFIG: cfg})
            for n, payload in payloads.items()
        }
        replies, _ = self.exchange.send(
            MessageType.EVALUATE, contents, server_round, self.cfg.strategy.round_timeout
        )
        pairs = []
        for nid, r in sorted(replies.items()):
            try:
                checked = check_eval_reply(r.content, self.silos[nid].num_eval_examples)
            except ReplyRejected as exc:
                self.registry.reject(server_round, nid, exc, "evaluate")
                continue
            pairs.append((checked.loss, checked.num_examples))
        if pairs:
            total = sum(n for _, n in pairs)
            loss = sum(v * n for v, n in pairs) / total
            self.events.emit(
                p.EV_EVALUATION, round=server_round, metrics={"eval_loss": loss, p.F_EXAMPLES: total}
            )
