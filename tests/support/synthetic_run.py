"""A synthetic federation run written as events, with the truth every exporter/report test checks against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from silotune.events import EventLog

SILOS = {"hospital-a": 101, "hospital-b": 102, "bank-c": 103}


ADAPTER_PARAMS = 12_288  # fp32 LoRA parameters: payload = params * 4 bytes per silo and direction


ROUNDS = 3


BUDGET_BYTES = 1_000_000.0  # small, so the "near budget" ratio is reached after three rounds


@dataclass
class Truth:
    uplink: dict[str, float] = field(default_factory=dict)
    downlink: dict[str, float] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    last_loss: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    cumulative: float = 0.0
    rounds_completed: int = 0
    accuracy: float = 0.0
    gpu_reserved: float = 0.0


def write_synthetic_run(run_dir: Path, events_dir: Path, silo_dirs: dict[str, Path]) -> Truth:
    """Write server events to run_dir/events.jsonl and events_dir/server.jsonl, and each silo's
    local_train events to silo_dirs[name]/silo.jsonl; return the expected totals."""
    server = EventLog("server", [run_dir / "events.jsonl", events_dir / "server.jsonl"])
    silo_logs = {name: EventLog("silo", [d / "silo.jsonl"]) for name, d in silo_dirs.items()}
    payload = ADAPTER_PARAMS * 4
    truth = Truth()
    server.emit(
        "run_start", run_id=4242, num_rounds=ROUNDS, strategy="fedavg", peft_method="lora",
        comm_budget_bytes=BUDGET_BYTES, base_model="tiny", adapter_parameters=ADAPTER_PARAMS,
    )  # fmt: skip
    for rnd in range(1, ROUNDS + 1):
        sampled = list(SILOS.values())
        server.emit("round_start", round=rnd, connected=len(SILOS), sampled=sampled)
        answered, failed, up_round, down_round = 0, 0, 0.0, 0.0
        losses = []
        for i, (name, node) in enumerate(SILOS.items()):
            down_round += payload  # sent to every sampled silo, answered or not
            if name == "bank-c" and rnd == 2:
                server.emit("silo_failed", round=rnd, node_id=node, reason="secret reason text")
                truth.failures[name] = truth.failures.get(name, 0) + 1
                failed += 1
                continue
            loss = 3.0 - 0.5 * rnd - 0.1 * i
            gpu = name == "hospital-a"
            fields = dict(
                round=rnd, silo=name, uplink_bytes=payload, downlink_bytes=payload,
                train_loss=loss, examples=40 + i, tokens=4000 + 100 * i,
                tokens_per_second=200.0 + i, train_seconds=20.0 + rnd,
                peak_gpu_allocated_bytes=6e9 + rnd if gpu else None,
                peak_gpu_reserved_bytes=7.5e9 if gpu else None,
                nvml_used_bytes=7.6e9 if gpu else None,
                gpu_total_bytes=8e9 if gpu else None,
                peak_rss_bytes=None if gpu else 2e9 + 1e6 * rnd,
                lora_rank=8,
            )  # fmt: skip
            server.emit("silo_result", node_id=node, **fields)
            if name in silo_logs:
                silo_logs[name].emit("local_train", **fields)
            truth.uplink[name] = truth.uplink.get(name, 0.0) + payload
            # Per-silo downlink is known from the silo's result only, as in the real events.
            truth.downlink[name] = truth.downlink.get(name, 0.0) + payload
            truth.results[name] = truth.results.get(name, 0) + 1
            truth.last_loss[name] = loss
            up_round += payload
            answered += 1
            losses.append(loss)
            if gpu:
                truth.gpu_reserved = 7.5e9
        if rnd == 3:
            server.emit("update_rejected", round=rnd, node_id=SILOS["bank-c"], reason="nan norm")
            truth.rejected["bank-c"] = 1
        truth.cumulative += up_round + down_round
        server.emit(
            "round_end", round=rnd, duration_seconds=30.0 + rnd, aggregation_seconds=0.5,
            sampled=len(SILOS), answered=answered, failed=failed, uplink_bytes=up_round,
            downlink_bytes=down_round, cumulative_bytes=truth.cumulative,
            train_loss=sum(losses) / len(losses), checkpoint=f"/private/path/round-{rnd}",
        )  # fmt: skip
        truth.accuracy = 0.5 + 0.1 * rnd
        server.emit("evaluation", round=rnd, metrics={"accuracy": truth.accuracy, "loss": 1.0})
        truth.rounds_completed = rnd
    server.emit("run_end", status="completed", rounds_completed=ROUNDS, adapter_dir="/x")
    return truth
