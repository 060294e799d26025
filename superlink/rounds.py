"""The federation's round loop: handshake, sample, send, validate, aggregate, checkpoint.

Written directly on Flower's Grid (Message API) rather than on ``flwr.serverapp.strategy``: FlexLoRA
sends every silo a different payload, every update is validated before it is averaged, a
per-round timeout drops slow silos, and every round is checkpointed atomically for resume.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from silotune.adapters import check_state_matches, from_array_record, to_array_record
from silotune.config import RunConfig, flatten_run_config, lr_for_round
from silotune.events import EventLog
from silotune.metrics import BYTES_PER_MB
from silotune.submit import PROGRESS_PREFIX  # `silotune run` parses these lines
from superlink.checkpoints import CheckpointStore
from superlink.strategies import SiloUpdate, Strategy, get_strategy

TRANSIENT_RETRIES = 10  # consecutive SuperLink errors tolerated before a round gives up

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


def sample_nodes(node_ids: list[int], fraction: float, min_nodes: int, rng: random.Random) -> list[int]:
    """FlowerTune's sampling: a fraction of the connected silos, but at least min-nodes."""
    k = min(len(node_ids), max(min_nodes, math.ceil(fraction * len(node_ids))))
    return sorted(rng.sample(sorted(node_ids), k))


class Federation:
    """Runs one federated job on a Grid (``sleep`` is injectable for tests)."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_dir: Path,
        run_id: str = "",
        sleep: Callable[[float], None] = time.sleep,
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
        self.cumulative_bytes = 0
        self.sleep = sleep

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
        for reply in self._push_and_pull(messages, timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                errors[nid] = reply.error.reason or f"error code {reply.error.code}"
            else:
                replies[nid] = reply
        for nid in contents:
            if nid not in replies and nid not in errors:
                errors[nid] = f"no reply within {timeout:.0f} s (strategy.round-timeout)"
        return replies, errors

    def _push_and_pull(self, messages: list[Message], timeout: float) -> list[Message]:
        """Grid.send_and_receive, but a transient SuperLink error (e.g. its SQLite state being
        busy under load: HTTP 500 "database is locked") is retried instead of ending the run."""
        deadline = time.monotonic() + timeout
        pending: set[str] = set()
        for attempt in range(TRANSIENT_RETRIES):
            try:
                pending = set(self.grid.push_messages(messages))
                break
            except Exception as exc:  # noqa: BLE001 - anything the transport raises
                if attempt == TRANSIENT_RETRIES - 1 or time.monotonic() > deadline:
                    raise
                log(WARNING, "pushing messages failed (%s); retrying", exc)
                self.sleep(2.0)
        got: list[Message] = []
        failures = 0
        while pending and time.monotonic() < deadline:
            try:
                batch = list(self.grid.pull_messages(pending))
                failures = 0
            except Exception as exc:  # noqa: BLE001
                failures += 1
                if failures >= TRANSIENT_RETRIES:
                    raise
                log(WARNING, "pulling replies failed (%s); retrying", exc)
                batch = []
            got.extend(batch)
            pending.difference_update(m.metadata.reply_to_message_id for m in batch)
            if pending:
                self.sleep(1.0)
        return got

    def _wait_for_nodes(self, needed: int) -> list[int]:
        deadline = time.monotonic() + self.cfg.strategy.wait_for_nodes
        while True:
            nodes = sorted(self.grid.get_node_ids())
            usable = [n for n in nodes if not self.silos.get(n, SiloInfo(n)).refused]
            if len(usable) >= needed or time.monotonic() > deadline:
                return usable
            log(INFO, "waiting for silos: %d connected, %d needed", len(usable), needed)
            self.sleep(2.0)

    # -- handshake ----------------------------------------------------------------------------
    def handshake(self, node_ids: list[int]) -> None:
        """Learn every new silo's base model, rank and data size; refuse mismatched ones."""
        new = [n for n in node_ids if n not in self.silos]
        if not new:
            return
        cfg_rec = ConfigRecord({"want-init": False})
        replies, errors = self._send(
            MessageType.QUERY,
            {n: RecordDict({"config": cfg_rec}) for n in new},
            0,
            self.cfg.strategy.round_timeout,
        )
        for nid, reply in replies.items():
            info, metrics = reply.content["info"], reply.content["metrics"]
            self.silos[nid] = SiloInfo(
                nid,
                str(info["silo"]),
                int(metrics["lora-rank"]),
                str(info["model-sha256"]),
                int(metrics["num-examples"]),
                int(metrics["num-eval-examples"]),
            )
        for nid, reason in errors.items():
            # Not refused for good: a silo whose data check failed may be fixed and come back.
            log(WARNING, "silo node %d failed its handshake: %s", nid, reason)
            self.events.emit("silo_failed", round=0, node_id=nid, reason=f"handshake: {reason}")
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
                self.events.emit("update_rejected", round=0, node_id=nid, silo=silo.name, reason=silo.refused)

    def _choose_reference(self) -> None:
        """The base model most silos run is the federation's (ties: lowest node id)."""
        by_sha: dict[str, list[int]] = {}
        for nid, s in sorted(self.silos.items()):
            by_sha.setdefault(s.model_sha256, []).append(nid)
        if by_sha:
            self.reference_sha = max(by_sha.items(), key=lambda kv: (len(kv[1]), -kv[1][0]))[0]

    def _initial_adapter(self) -> None:
        """Ask one silo for a freshly initialised adapter: the central site needs no model."""
        candidates = [n for n, s in sorted(self.silos.items()) if not s.refused]
        for nid in candidates:
            content = RecordDict({"config": ConfigRecord({"want-init": True})})
            replies, errors = self._send(
                MessageType.QUERY, {nid: content}, 0, self.cfg.strategy.round_timeout
            )
            if nid in replies:
                self.global_state = dict(from_array_record(replies[nid].content["arrays"]))
                self.peft_config = json.loads(str(replies[nid].content["info"]["peft-config"]))
                self.peft_config["base_model_name_or_path"] = self.cfg.model.name
                return
            log(WARNING, "silo node %d could not provide the initial adapter: %s", nid, errors.get(nid))
        raise RuntimeError("no silo could provide the initial adapter; check the silos' logs")

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
        cfg = self.cfg
        start_round = self._resume()
        nodes = self._wait_for_nodes(cfg.strategy.min_nodes)
        self.handshake(nodes)
        if not self.global_state:
            self._initial_adapter()
        self.events.emit(
            "run_start",
            num_rounds=cfg.num_rounds,
            start_round=start_round + 1,
            strategy=cfg.strategy.name,
            peft_method=cfg.peft.method,
            comm_budget_bytes=int(cfg.comm_budget_mb * BYTES_PER_MB),
            run_id=self.run_id,
            base_model={"name": cfg.model.name, "sha256": self.reference_sha},
            adapter_parameters=int(sum(v.size for v in self.global_state.values())),
        )
        last_ckpt: Path | None = None
        completed = start_round
        status = "completed"
        for rnd in range(start_round + 1, cfg.num_rounds + 1):
            outcome = self.run_round(rnd)
            completed = rnd if outcome.answered else completed
            last_ckpt = Path(outcome.checkpoint) if outcome.checkpoint else last_ckpt
            budget = cfg.comm_budget_mb * BYTES_PER_MB
            if budget and self.cumulative_bytes > budget:
                log(
                    WARNING,
                    "communication budget exceeded (%.1f MB > %.1f MB): stopping",
                    self.cumulative_bytes / BYTES_PER_MB,
                    cfg.comm_budget_mb,
                )
                status = "budget_exceeded"
                break
        self.events.emit(
            "run_end", status=status, rounds_completed=completed, adapter_dir=str(self.run_dir / "adapter")
        )
        return last_ckpt

    def run_round(self, rnd: int) -> RoundOutcome:
        cfg = self.cfg
        t0 = time.monotonic()
        nodes = self._wait_for_nodes(cfg.strategy.min_nodes)
        self.handshake(nodes)
        usable = [n for n in nodes if n in self.silos and not self.silos[n].refused]
        if not usable:
            raise RuntimeError(
                f"round {rnd}: no usable silo connected within {cfg.strategy.wait_for_nodes:.0f} s "
                "(strategy.wait-for-nodes); check the silos' logs and admissions"
            )
        sampled = sample_nodes(
            usable,
            cfg.strategy.fraction_train,
            cfg.strategy.min_nodes,
            random.Random(cfg.train.seed * 7919 + rnd),
        )
        self.events.emit("round_start", round=rnd, connected=len(nodes), sampled=sampled)
        lr = lr_for_round(cfg.train, rnd - 1, cfg.num_rounds)
        base_cfg = {
            "server-round": rnd,
            "num-rounds": cfg.num_rounds,
            "lr": lr,
            "model-sha256": self.reference_sha,
            "model-name": cfg.model.name,
            **self.strategy.silo_config(),
        }
        contents, down = {}, {}
        for nid in sampled:
            payload = self.strategy.payload_for(self.global_state, self.silos[nid].rank, rnd)
            arrays = to_array_record(payload)
            down[nid] = arrays.count_bytes()
            contents[nid] = RecordDict({"arrays": arrays, "config": ConfigRecord(base_cfg)})
        replies, errors = self._send(MessageType.TRAIN, contents, rnd, cfg.strategy.round_timeout)
        updates, per_silo, uplink = [], [], 0
        for nid, reason in sorted(errors.items()):
            self.events.emit("silo_failed", round=rnd, node_id=nid, silo=self.silos[nid].name, reason=reason)
            log(WARNING, "round %d: silo %s (node %d) failed: %s", rnd, self.silos[nid].name, nid, reason)
        for nid, reply in sorted(replies.items()):
            silo = self.silos[nid]
            up = reply.content["arrays"].count_bytes() if "arrays" in reply.content else 0
            uplink += up
            try:
                update = self._validate(nid, reply, rnd)
            except ValueError as exc:
                self.events.emit("update_rejected", round=rnd, node_id=nid, silo=silo.name, reason=str(exc))
                log(WARNING, "round %d: rejected update of silo %s: %s", rnd, silo.name, exc)
                continue
            updates.append(update)
            m = update.metrics
            row = {
                "round": rnd,
                "node_id": nid,
                "silo": silo.name,
                "uplink_bytes": up,
                "downlink_bytes": down[nid],
                "train_loss": m.get("train-loss"),
                "examples": update.num_examples,
                "tokens": m.get("tokens"),
                "tokens_per_second": m.get("tokens-per-second"),
                "train_seconds": m.get("train-seconds"),
                "lora_rank": update.rank,
                **{
                    k.replace("-", "_"): m.get(k)
                    for k in (
                        "peak-gpu-allocated-bytes",
                        "peak-gpu-reserved-bytes",
                        "nvml-used-bytes",
                        "gpu-total-bytes",
                        "peak-rss-bytes",
                    )
                },
            }
            per_silo.append(row)
            self.events.emit("silo_result", **row)
        downlink = sum(down.values())
        self.cumulative_bytes += uplink + downlink
        agg_seconds, ckpt_path, loss = 0.0, "", None
        if updates:
            t_agg = time.monotonic()
            self.global_state = dict(self.strategy.aggregate(self.global_state, updates))
            agg_seconds = time.monotonic() - t_agg
            total = sum(u.num_examples for u in updates)
            loss = sum(u.metrics["train-loss"] * u.num_examples for u in updates) / total
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
            time.monotonic() - t0,
            agg_seconds,
            ckpt_path,
            per_silo,
        )
        self.events.emit(
            "round_end",
            round=rnd,
            duration_seconds=outcome.duration_seconds,
            aggregation_seconds=agg_seconds,
            sampled=len(sampled),
            answered=outcome.answered,
            failed=outcome.failed,
            uplink_bytes=uplink,
            downlink_bytes=downlink,
            cumulative_bytes=self.cumulative_bytes,
            train_loss=loss,
            checkpoint=ckpt_path,
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

    def _validate(self, nid: int, reply: Message, rnd: int) -> SiloUpdate:
        silo = self.silos[nid]
        content = reply.content
        if "arrays" not in content or "metrics" not in content:
            raise ValueError("reply lacks adapter arrays or metrics")
        sha = str(content["info"].get("model-sha256", "")) if "info" in content else ""
        if sha != self.reference_sha:
            raise ValueError(f"trained on base model {sha[:12]}, expected {self.reference_sha[:12]}")
        state = dict(from_array_record(content["arrays"]))
        expected = self.strategy.expected_shapes(self.global_state, silo.rank)
        check_state_matches(expected, state, f"silo {silo.name}")
        metrics = {k: float(v) for k, v in content["metrics"].items() if isinstance(v, (int, float))}
        n = int(metrics.get("num-examples", 0))
        if n <= 0:
            raise ValueError("reported no training examples")
        if not math.isfinite(metrics.get("train-loss", float("nan"))):
            raise ValueError("reported a non-finite training loss")
        return SiloUpdate(nid, state, n, silo.rank, metrics)

    def _checkpoint(self, rnd: int, loss: float, per_silo: list[dict[str, Any]]) -> Path:
        adapter, rank = self.strategy.checkpoint_adapter(self.global_state)
        peft_config = dict(self.peft_config)
        if rank is not None and "r" in peft_config:
            peft_config["r"] = rank
        manifest = {
            "run_config": flatten_run_config(self.cfg),
            "base_model": {"name": self.cfg.model.name, "sha256": self.reference_sha},
            "metrics": {"train_loss": loss, "silos": per_silo},
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
            {"server-round": rnd, "model-sha256": self.reference_sha, "model-name": self.cfg.model.name}
        )
        contents = {
            n: RecordDict(
                {
                    "arrays": to_array_record(
                        self.strategy.payload_for(self.global_state, self.silos[n].rank, rnd)
                    ),
                    "config": cfg,
                }
            )
            for n in targets
        }
        replies, _ = self._send(MessageType.EVALUATE, contents, rnd, self.cfg.strategy.round_timeout)
        pairs = [
            (float(r.content["metrics"]["eval-loss"]), int(r.content["metrics"]["num-examples"]))
            for r in replies.values()
            if "eval-loss" in r.content["metrics"]
        ]
        if pairs:
            total = sum(n for _, n in pairs)
            loss = sum(v * n for v, n in pairs) / total
            self.events.emit("evaluation", round=rnd, metrics={"eval_loss": loss, "examples": total})
