"""A LocalFederation that can be hurt: kill and restart its processes, follow a run by its events.

Used by tests/test_fault_scenarios.py and benchmarks/faults.py. Every process it starts is a real
Flower process on loopback (127.0.0.1); processes are killed and stopped by PID only. A restarted
process gets exactly the command line, environment and working directory it had (read from /proc
before the kill), like a supervisor restarting it.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo.local_federation import CONNECTION, LocalFederation, SiloSpec
from silotune.events import read_events
from silotune.processes import ManagedProcess, start_process
from superlink.app.watchdog import MIN_BOUND_SECONDS
from superlink.ops.run_journal import _submit_detached, record_submission
from tests.support.federation_runs import write_silo_data


def silo_specs(ws: Path, names: list[str]) -> list[SiloSpec]:
    specs = []
    for i, name in enumerate(names):
        data = ws / f"{name}.jsonl"
        write_silo_data(data, seed=i, n=16)  # small silos: fault runs are about timing, not data
        specs.append(SiloSpec(name, data, {"columns": "input=text,output=label"}))
    return specs


def run_config(model: Path, run_dir: str, rounds: int, min_nodes: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model.name": str(model),
        "num-rounds": rounds,
        "strategy.min-nodes": min_nodes,
        "run-dir": run_dir,
        "train.local-steps": 1,
        "train.batch-size": 2,
        "train.seq-length": 48,
        "train.lr-max": 5e-3,
        "strategy.round-timeout": 120.0,
        "strategy.wait-for-nodes": 300.0,
    }
    cfg.update(extra)
    return cfg


@dataclass
class Snapshot:
    argv: list[str]
    env: dict[str, str]
    cwd: str


def snapshot(pid: int) -> Snapshot:
    """How a process was started: argv, environment, working directory (from /proc)."""
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode() for a in fh.read().split(b"\0") if a]
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(kv.decode().split("=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    return Snapshot(argv, env, os.readlink(f"/proc/{pid}/cwd"))


def find_pids(needle: str, also: str = "") -> list[int]:
    """PIDs whose command line contains ``needle`` (and ``also``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and also in cmd:
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class FaultFederation(LocalFederation):
    """LocalFederation plus: which process is which, kill/restart by PID, detached runs.

    It starts the federation itself (same steps as LocalFederation.start) so that the SuperLink's
    options are kept for a restart on the same addresses, and operator commands use the
    SuperLink's loopback operator address (the public port is the Fleet proxy's).

    Its silos use the resident worker (silo_node/ops/worker.py, the product's default executor) unless
    told otherwise; ``executor="per-message"`` gives Flower's fresh ClientApp process per message.
    """

    def __init__(self, *args: Any, executor: str = "resident", **kwargs: Any) -> None:
        super().__init__(*args, executor=executor, **kwargs)

    def _superlink_options(self) -> Any:
        from superlink.ops.launch import SuperLinkOptions

        if not hasattr(self, "_internal_port"):
            from demo.local_federation import free_port

            self._internal_port = free_port()
        return SuperLinkOptions(
            ca_cert=None if self.insecure else self.ca_dir / "ca.crt",
            server_cert=None if self.insecure else self.server_dir / "server.pem",
            server_key=None if self.insecure else self.server_dir / "server.key",
            host="127.0.0.1",
            port=self.port,
            internal_port=self._internal_port,
            database=self.ws / "central" / "state.db",
            events_dir=self.events_dir,
            flwr_home=self.flwr_home,
            insecure=self.insecure,
        )

    def start(self) -> None:
        from demo.local_federation import free_port
        from silo_node.app.allotment import available_cpus
        from silo_node.ops.launch import SiloOptions, start_silo
        from silotune.flwr_connection import write_connection
        from superlink.ops.admission import admit_silo
        from superlink.ops.launch import operator_address, start_superlink

        self.create_identity()
        opts = self._superlink_options()
        self.runs_root.mkdir(parents=True, exist_ok=True)
        os.environ["SILOTUNE_RUNS_ROOT"] = str(self.runs_root)
        self.group.add(start_superlink(opts, self.ws / "logs" / "superlink.log", cwd=self.ws / "central"))
        ca = None if self.insecure else self.ca_dir / "ca.crt"
        write_connection(self.flwr_home, CONNECTION, operator_address(opts), ca, insecure=self.insecure)
        if not self.insecure:
            for s in self.silos:
                admit_silo(self.public_key(s), s.name, self.flwr_home, connection=CONNECTION)
        threads = max(1, available_cpus() // max(1, len(self.silos)))
        for s in self.silos:
            node_config = self.silo_node_config(s)  # with the local federation's policy
            sopts = SiloOptions(
                superlink=self.address, node_config=node_config, ca_cert=ca,
                node_key=None if self.insecure else self.private_key(s), insecure=self.insecure,
                runtime_port=free_port(), events_dir=self.silo_dir(s) / "events",
                flwr_home=self.silo_dir(s) / "flwr-home", executor=self.executor, threads=threads,
            )  # fmt: skip
            log = self.ws / "logs" / f"silo-{s.name}.log"
            self.group.add(start_silo(sopts, log, run_domain=self.run_domain))
        self.resume_interrupted_runs()

    # -- processes ------------------------------------------------------------------------------
    @property
    def central(self) -> ManagedProcess:
        return self.group.processes[0]

    def silo_proc(self, name: str) -> ManagedProcess:
        index = [s.name for s in self.silos].index(name)
        return self.group.processes[1 + index]

    def _replace(self, old: ManagedProcess, new: ManagedProcess) -> None:
        self.group.processes[self.group.processes.index(old)] = new

    def supernode_pid(self, name: str) -> int:
        """The silo's flower-supernode: the managed process itself (per-message executor), or the
        child of its supervisor (silo_node/ops/supervisor.py, resident worker)."""
        from silotune.processes import _family

        leader = self.silo_proc(name).pid
        for pid in [leader, *sorted(_family(leader, False) - {leader})]:
            try:
                argv = snapshot(pid).argv
            except OSError:
                continue
            if any(a.endswith("flower-supernode") for a in argv[:2]):
                return pid
        raise AssertionError(f"no flower-supernode process for silo {name}")

    def kill_silo(self, name: str, sig: int = signal.SIGKILL) -> Snapshot:
        """Signal a silo's SuperNode (only that PID); returns how to start the silo again (the
        managed process: the SuperNode, or its supervisor, which exits with its SuperNode)."""
        snap = snapshot(self.silo_proc(name).pid)
        os.kill(self.supernode_pid(name), sig)
        return snap

    def restart_silo(self, name: str, snap: Snapshot) -> ManagedProcess:
        old = self.silo_proc(name)
        old.stop(grace=5)  # reaps it, and ends what it left behind (its executor's children)
        new = start_process(old.name, snap.argv, old.log_path, env=snap.env, cwd=Path(snap.cwd))
        self._replace(old, new)
        return new

    def supervise_silo(self, name: str, snap: Snapshot, pause: float = 5.0, limit: int = 40) -> None:
        """Restart the silo now and whenever it exits, ``pause`` s later (a supervisor such as
        compose's ``restart: unless-stopped``), at most ``limit`` times, until ``unsupervise``.

        Needed because Flower activates a node only from REGISTERED or OFFLINE: a SuperNode
        restarted with the same key before the SuperLink has marked its killed predecessor offline
        (2 missed heartbeats) is refused and exits with code 305."""
        import threading

        self._supervised = getattr(self, "_supervised", {})
        stop = threading.Event()
        restarts: list[float] = []
        self._supervised[name] = (stop, restarts)

        def loop() -> None:
            while not stop.is_set() and len(restarts) < limit:
                if not self.silo_proc(name).running() or not restarts:
                    if restarts:
                        stop.wait(pause)
                    if stop.is_set():
                        return
                    self.restart_silo(name, snap)
                    restarts.append(time.time())
                stop.wait(0.5)

        threading.Thread(target=loop, daemon=True).start()

    def unsupervise(self, name: str) -> int:
        """Stop supervising; returns how many starts it took."""
        stop, restarts = self._supervised.pop(name)
        stop.set()
        time.sleep(1.0)
        return len(restarts)

    def check(self) -> None:
        """Like the group's check, except for silos under supervise_silo (they may be restarting)."""
        supervised = {self.silo_proc(n) for n in getattr(self, "_supervised", {})}
        for proc in self.group.processes:
            if proc not in supervised:
                proc.check()

    def superlink_pid(self) -> int:
        return self.central.pid

    def serverapp_pids(self) -> list[int]:
        port = self.central_internal_port()
        return [p for p in find_pids("flwr-serverapp", f"127.0.0.1:{port} ") if alive(p)]

    def central_internal_port(self) -> int:
        argv = snapshot(self.superlink_pid()).argv if alive(self.superlink_pid()) else self._argv
        return int(argv[argv.index("--port") + 1])

    def kill_superlink(self) -> None:
        self._argv = snapshot(self.superlink_pid()).argv
        os.kill(self.superlink_pid(), signal.SIGKILL)

    def kill_serverapp(self) -> list[int]:
        pids = self.serverapp_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def restart_central(self) -> list[str]:
        """Stop whatever is left of the central site, start it again on the same addresses and
        database, and let it resume the interrupted runs (as `silotune superlink start` does)."""
        from superlink.ops.launch import start_superlink

        old = self.central
        old.stop(grace=5)
        log = self.ws / "logs" / "superlink.log"
        new = start_superlink(self._superlink_options(), log, cwd=self.ws / "central")
        self._replace(old, new)
        return self.resume_interrupted_runs()

    # -- runs -----------------------------------------------------------------------------------
    def start_run(self, cfg: dict[str, Any]) -> str:
        """Submit like LocalFederation.submit (journal first) but do not follow the stream."""
        record_submission(self.journal, cfg, CONNECTION)
        return _submit_detached(self.flwr_home, CONNECTION, cfg)

    def events(self, run_dir: str) -> list[dict[str, Any]]:
        return list(read_events(self.runs_root / run_dir / "events.jsonl"))

    def wait_event(
        self, run_dir: str, pred: Any, timeout: float, what: str, check: bool = True
    ) -> dict[str, Any]:
        """The first event (from the start of the log) matching ``pred``; bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(run_dir):
                if pred(e):
                    return e
            if check:
                self.check()
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; logs: {self.ws / 'logs'}")

    def wait_run_end(self, run_dir: str, timeout: float, after: float = 0.0) -> dict[str, Any]:
        return self.wait_event(
            run_dir, lambda e: e["kind"] == "run_end" and e["ts"] >= after, timeout, f"{run_dir} to end"
        )


def checkpoint_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*"))


def latest_round(run_dir: Path) -> int:
    try:
        return int((run_dir / "LATEST").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def corrupt_checkpoints(run_dir: Path, model: Path) -> list[str]:
    """Checkpoint dirs that PeftModel.from_pretrained cannot load (with why)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bad = []
    for ckpt in sorted((run_dir / "checkpoints").glob("round-*")):
        try:
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), ckpt)
        except Exception as exc:  # noqa: BLE001 - any failure to load is what we count
            bad.append(f"{ckpt.name}: {type(exc).__name__}: {exc}")
    return bad


# -- scenarios: each runs once and returns its tally -------------------------------------------------
@dataclass
class Tally:
    scenario: str
    survived: bool
    rounds_lost: int
    corrupt_checkpoints: int
    detail: dict[str, Any]


def _round_ends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "round_end" and e.get("adapter_updated")]


KILL_ATTEMPTS = 4  # a kill that would land after the round ended is not made; the run is redone


def _mid_round(
    fed: FaultFederation, run_dir: str, rnd: int, rng: random.Random, spread: float
) -> float | None:
    """Wait for round ``rnd`` to start, then a random moment of it (0..spread s after its training
    messages went out, at most 0.8 x the fastest training reply of the round before: a resident
    silo answers a tiny model's round in about 3 s, Flower's per-message process in about 8 s).
    Returns that moment's time, or None when round ``rnd`` already ended by then: a kill then
    would not be mid-round, and the caller redoes the repetition with a shorter spread."""
    fed.wait_event(run_dir, lambda e: e["kind"] == "round_start" and e["round"] == rnd, 900,
                   f"round {rnd} of {run_dir}")  # fmt: skip
    before = [e["reply_seconds"] for e in fed.events(run_dir) if e["kind"] == "silo_reply"
              and e.get("phase") == "train" and e["round"] == rnd - 1]  # fmt: skip
    if before:
        spread = min(spread, 0.8 * min(before))
    time.sleep(rng.uniform(0.0, spread))
    return None if _round_ended(fed, run_dir, rnd) else time.time()


def _start_until_mid_round(
    fed: FaultFederation, name: str, cfg: dict[str, Any], rnd: int, rng: random.Random, spread: float
) -> tuple[str, int]:
    """Start runs ``name``, ``name-1``, ... until one is caught mid-round ``rnd`` (the spread
    halves after each miss); returns its run dir and how many runs were redone."""
    for attempt in range(KILL_ATTEMPTS):
        run_dir = name + (f"-{attempt}" if attempt else "")
        fed.start_run({**cfg, "run-dir": run_dir})
        if _mid_round(fed, run_dir, rnd, rng, spread / 2**attempt) is not None:
            return run_dir, attempt
        fed.wait_run_end(run_dir, 900)  # the round ended first: let the run finish, then redo it
    raise AssertionError(f"{name}: round {rnd} always ended before the kill moment")


def _round_ended(fed: FaultFederation, run_dir: str, rnd: int) -> bool:
    return any(e["kind"] == "round_end" and e["round"] == rnd for e in fed.events(run_dir))


def _resumed_run_end(fed: FaultFederation, run_dir: str, since: float) -> dict[str, Any]:
    """The run_end of the run resumed after ``since`` (stopping the old site makes an orphaned
    ServerApp write its own run_end, status "stopped", after ``since``: not that one)."""
    start = fed.wait_event(run_dir, lambda e: e["kind"] == "run_start" and e["ts"] >= since, 900,
                           f"the resumed {run_dir} to start")  # fmt: skip
    return fed.wait_run_end(run_dir, 1200, after=start["ts"])


def central_kill(
    fed: FaultFederation, model: Path, rep: int, rng: random.Random, what: str, rounds: int = 3,
    kill_round: int = 2, spread: float = 8.0,
) -> Tally:  # fmt: skip
    """SIGKILL the SuperLink (``what="superlink"``) or the ServerApp (``"serverapp"``) at a random
    moment of round ``kill_round``, restart the central site, let the journal resume the run."""
    run_dir, misses = _start_until_mid_round(
        fed, f"{what}-kill-{rep}", run_config(model, "", rounds, len(fed.silos)), kill_round, rng, spread
    )
    path = fed.runs_root / run_dir
    if what == "superlink":
        fed.kill_superlink()
        killed = [fed.central.pid]
    else:
        killed = fed.kill_serverapp()
    time.sleep(1.0)
    at_kill = latest_round(path)
    before = {e["round"] for e in _round_ends(fed.events(run_dir))}
    restarted_at = time.time()
    resumed = fed.restart_central()
    end = _resumed_run_end(fed, run_dir, restarted_at)
    events = fed.events(run_dir)
    starts = [e["start_round"] for e in events if e["kind"] == "run_start" and e["ts"] >= restarted_at]
    after = [e["round"] for e in _round_ends(events) if e["ts"] >= restarted_at]
    repeated = sorted(set(after) & before) + sorted(r for r in after if r <= at_kill)
    missing = sorted(set(range(1, rounds + 1)) - set(checkpoint_rounds(path)))
    corrupt = corrupt_checkpoints(path, model)
    survived = (
        bool(killed) and end["status"] == "completed" and end["rounds_completed"] == rounds
        and starts[:1] == [at_kill + 1] and not missing and not corrupt and len(resumed) == 1
    )  # fmt: skip
    return Tally(f"{what}-kill", survived, len(set(repeated)) + len(missing), len(corrupt), {
        "killed_pids": killed, "checkpoint_at_kill": at_kill, "resumed_at_round": starts,
        "resubmitted": resumed, "status": end["status"], "rounds_completed": end["rounds_completed"],
        "repeated": sorted(set(repeated)), "missing": missing, "corrupt": corrupt,
        "redone_because_round_ended_first": misses,
    })  # fmt: skip


def silo_kill(
    fed: FaultFederation, model: Path, rep: int, rng: random.Random, rounds: int = 3,
    kill_round: int = 2, spread: float = 8.0, down: float = 3.0,
) -> Tally:  # fmt: skip
    """SIGKILL one silo's SuperNode at a random moment of a round, restart it with the same
    command line: the round completes with the others and the silo is back in a later round.

    Use at least kill_round + 2 rounds: until the SuperLink marks the killed node offline (2 missed
    heartbeats, about a minute) it still counts as connected, so the next round is sent to it and
    completes without it; the round after that waits for min-nodes silos, i.e. for the restarted
    one. (With rounds of a few seconds the run would otherwise end before the silo can rejoin.)"""
    victim = fed.silos[rep % len(fed.silos)].name
    # The silo's lost message costs the round at most the watchdog's bound (the others answered).
    cfg = run_config(model, "", rounds, len(fed.silos), **{"strategy.round-timeout": 90.0})
    run_dir, misses = _start_until_mid_round(fed, f"silo-kill-{rep}", cfg, kill_round, rng, spread)
    path = fed.runs_root / run_dir
    snap = fed.kill_silo(victim)
    killed_at = time.time()
    time.sleep(down)
    fed.supervise_silo(victim, snap)
    try:
        end = fed.wait_run_end(run_dir, 1200)
    finally:
        starts = fed.unsupervise(victim)
    events = fed.events(run_dir)
    ends = {e["round"]: e for e in events if e["kind"] == "round_end"}
    results = [e for e in events if e["kind"] == "silo_result" and e["silo"] == victim]
    back = sorted(e["round"] for e in results if e["round"] > kill_round)
    missing = sorted(set(range(1, rounds + 1)) - set(checkpoint_rounds(path)))
    corrupt = corrupt_checkpoints(path, model)
    kill_round_ok = bool(ends.get(kill_round, {}).get("adapter_updated"))
    survived = (end["status"] == "completed" and kill_round_ok and bool(back) and not missing
                and not corrupt)  # fmt: skip
    back_at = next((e["ts"] for e in results if e["round"] > kill_round), None)
    return Tally("silo-kill", survived, len(missing), len(corrupt), {
        "victim": victim, "supervisor_starts": starts,
        "back_after_seconds": round(back_at - killed_at, 1) if back_at else None,
        "answered_in_kill_round": ends.get(kill_round, {}).get("answered"),
        "kill_round_seconds": ends.get(kill_round, {}).get("duration_seconds"),
        "victim_back_in_rounds": back, "status": end["status"], "missing": missing,
        "redone_because_round_ended_first": misses,
    })  # fmt: skip


def _silo_family(fed: FaultFederation) -> set[int]:
    """Every process of every silo: its SuperNode, the executor and the ClientApp it started."""
    from silotune.processes import _family

    pids: set[int] = set()
    for s in fed.silos:
        pids |= _family(fed.silo_proc(s.name).pid, False) | {fed.silo_proc(s.name).pid}
    return pids


def alert_expr(name: str) -> str:
    import yaml

    rules = Path(__file__).resolve().parents[2] / "monitoring/prometheus/rules/silotune-alerts.yml"
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return str(rule["expr"])
    raise KeyError(name)


def _silo_executors(fed: FaultFederation) -> set[int]:
    """What runs the silos' training: the resident worker (silo_node.ops.worker), or Flower's
    flower-superexec, which starts a ClientApp per message."""
    out = set()
    for pid in _silo_family(fed):
        try:
            argv = snapshot(pid).argv
            if any(a.endswith("flower-superexec") or a == "silo_node.ops.worker" for a in argv[:3]):
                out.add(pid)
        except OSError:
            continue
    return out


def stalled_silos(
    fed: FaultFederation, model: Path, rep: int, rng: random.Random, prom: str, rounds: int = 2,
    stall_round: int = 2,
) -> Tally:  # fmt: skip
    """Every silo hangs where Flower cannot see it: what runs its training (the resident worker, or
    Flower's flower-superexec) is SIGSTOPped
    just before round ``stall_round``, so its SuperNode keeps heartbeating and takes the training
    message, but no ClientApp ever runs it. The watchdog must fail the round within its bound,
    SiloTuneRoundFailedByWatchdog's expression must be true in Prometheus (``prom`` scrapes the
    central exporter), and after SIGCONT the run goes on.

    (Stopping the SuperNode itself, or the ClientApp, is not a silent stall in Flower 1.41: the
    SuperLink answers for a node that missed 2 heartbeats (NODE_UNAVAILABLE), the SuperNode for a
    ClientApp whose task heartbeat expired (CLIENT_APP_CRASHED), both within about a minute.)"""
    from tests.support.monitoring_stack import query

    run_dir = f"stalled-{rep}"
    factor = 1.0
    cfg = run_config(model, run_dir, rounds, len(fed.silos),
                     **{"strategy.watchdog-factor": factor, "strategy.round-timeout": 600.0})  # fmt: skip
    started = time.time()
    fed.start_run(cfg)
    fed.wait_event(run_dir, lambda e: e["kind"] == "round_end" and e["round"] == stall_round - 1, 900,
                   f"round {stall_round - 1} of {run_dir}")  # fmt: skip
    stopped = _silo_executors(fed)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        stall = fed.wait_event(run_dir, lambda e: e["kind"] == "round_stalled", 900, "the watchdog",
                               check=False)  # fmt: skip
        events = fed.events(run_dir)
        durations = [e["duration_seconds"] for e in events
                     if e["kind"] == "round_end" and e["answered"] and e["ts"] >= started]  # fmt: skip
        bound = max(MIN_BOUND_SECONDS, factor * statistics.median(durations)) if durations else None
        progress = [e["ts"] for e in events if e["ts"] < stall["ts"] and e["kind"] in (
            "round_start", "silo_reply", "round_end")]  # fmt: skip
        silent = stall["ts"] - max(progress)
        expr = alert_expr("SiloTuneRoundFailedByWatchdog")
        deadline, alert = time.monotonic() + 90, []
        while not alert and time.monotonic() < deadline:
            alert = query(prom, expr)
            time.sleep(1.0)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    end = fed.wait_run_end(run_dir, 900)
    # Slack: the pull loop polls once a second, plus one Grid call and an event write.
    within = bound is not None and silent <= bound + 15.0
    survived = bool(stopped) and within and bool(alert) and end["status"] == "completed"
    missing = sorted(set(range(1, rounds + 1)) - set(checkpoint_rounds(fed.runs_root / run_dir)))
    corrupt = corrupt_checkpoints(fed.runs_root / run_dir, model)
    return Tally("stalled-silo", survived and not corrupt, len(missing), len(corrupt), {
        "stopped_executors": len(stopped), "silent_seconds_before_fail": round(silent, 1),
        "watchdog_bound_seconds": bound, "reason": stall["reason"], "alert_expr_true": bool(alert),
        "status": end["status"], "rounds_without_new_adapter": missing,
    })  # fmt: skip


def disk_full(
    fed: FaultFederation, model: Path, rep: int, rng: random.Random, rounds: int = 2,
    size: str = "4m",
) -> Tally:  # fmt: skip
    """The run dir is a small tmpfs; it is filled after round 1's checkpoint: round 2's checkpoint
    fails, round 1's stays intact, the run stops with a clear error; once space is freed, a resume
    continues from round 1."""
    import subprocess

    run_dir = f"disk-full-{rep}"
    path = fed.runs_root / run_dir
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   timeout=30)  # fmt: skip
    filler = path / "filler"
    try:
        fed.start_run(run_config(model, run_dir, rounds, len(fed.silos)))
        fed.wait_event(run_dir, lambda e: e["kind"] == "round_end" and e["round"] == 1, 900, "round 1")
        filled_at = time.time()
        with open(filler, "wb") as fh:
            chunk = b"\0" * 65536
            for _ in range(4096):  # bounded: far more than the tmpfs holds
                try:
                    fh.write(chunk)
                    fh.flush()
                except OSError:
                    break
        central = fed.events_dir / "server.jsonl"  # not on the full disk
        deadline, failed = time.monotonic() + 900, None
        while failed is None and time.monotonic() < deadline:
            failed = next((e for e in read_events(central) if e["kind"] == "run_end"
                           and e["ts"] >= filled_at), None)  # fmt: skip
            time.sleep(1.0)
        assert failed is not None, "the run did not stop on the full disk"
        intact_latest = latest_round(path)
        intact = corrupt_checkpoints(path, model)
        leftovers = [p.name for p in (path / "checkpoints").iterdir() if p.name != "round-0001"]
        filler.unlink()
        resumed_at = time.time()
        resumed = fed.resume_interrupted_runs()
        end = _resumed_run_end(fed, run_dir, resumed_at)
        starts = [e["start_round"] for e in fed.events(run_dir)
                  if e["kind"] == "run_start" and e["ts"] >= resumed_at]  # fmt: skip
        missing = sorted(set(range(1, rounds + 1)) - set(checkpoint_rounds(path)))
        corrupt = corrupt_checkpoints(path, model)
    finally:
        if filler.exists():
            filler.unlink()
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)
    clear = "no space left" in failed.get("reason", "").lower() and "round-0001 is intact" in failed["reason"]
    survived = (
        failed["status"] == "failed" and clear and intact_latest == 1 and not intact
        and not leftovers and starts[:1] == [2] and end["status"] == "completed"
        and not missing and not corrupt and len(resumed) == 1
    )  # fmt: skip
    return Tally("disk-full", survived, len(missing), len(corrupt) + len(intact), {
        "failure": failed.get("reason", "")[:300], "latest_after_failure": intact_latest,
        "leftovers": leftovers, "resumed_at_round": starts, "status": end["status"],
    })  # fmt: skip
