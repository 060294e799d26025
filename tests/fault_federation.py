"""A LocalFederation that can be hurt: kill and restart its processes, follow a run by its events.

Used by tests/test_fault_scenarios.py and benchmarks/faults.py. Every process it starts is a real
Flower process on loopback (127.0.0.1); processes are killed and stopped by PID only. A restarted
process gets exactly the command line, environment and working directory it had (read from /proc
before the kill), like a supervisor restarting it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo.local_federation import CONNECTION, LocalFederation, SiloSpec
from silotune.events import read_events
from silotune.processes import ManagedProcess, start_process
from superlink.run_journal import _submit_detached, record_submission

WORDS = {
    "negative": ["fell", "plunged", "missed", "cut"],
    "positive": ["rose", "beat", "soared", "raised"],
    "neutral": ["held", "announced", "scheduled", "filed"],
}


def write_silo_data(path: Path, seed: int, n: int = 16) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            text = f"Company {rng.randint(1, 99)} shares {rng.choice(WORDS[label])} after the report"
            fh.write(json.dumps({"text": text, "label": label}) + "\n")


def silo_specs(ws: Path, names: list[str]) -> list[SiloSpec]:
    specs = []
    for i, name in enumerate(names):
        data = ws / f"{name}.jsonl"
        write_silo_data(data, seed=i)
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
    SuperLink's loopback operator address (the public port is the Fleet proxy's)."""

    def _superlink_options(self) -> Any:
        from superlink.launch import SuperLinkOptions

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
        from silo_node.allotment import available_cpus
        from silo_node.launch import SiloOptions, start_silo
        from silotune.flwr_connection import write_connection
        from superlink.admission import admit_silo
        from superlink.launch import operator_address, start_superlink

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
            node_config = {"data-path": str(s.data_path), "name": s.name, **s.node_config}
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

    def kill_silo(self, name: str, sig: int = signal.SIGKILL) -> Snapshot:
        """Signal a silo's SuperNode (only that PID); returns how to start it again."""
        proc = self.silo_proc(name)
        snap = snapshot(proc.pid)
        os.kill(proc.pid, sig)
        return snap

    def restart_silo(self, name: str, snap: Snapshot) -> ManagedProcess:
        old = self.silo_proc(name)
        old.stop(grace=5)  # reaps it, and ends what it left behind (its executor's children)
        new = start_process(old.name, snap.argv, old.log_path, env=snap.env, cwd=Path(snap.cwd))
        self._replace(old, new)
        return new

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
        from superlink.launch import start_superlink

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
                self.group.check()
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
