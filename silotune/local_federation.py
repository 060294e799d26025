"""A whole federation on one machine, as real separate processes: the demo and the tests use it.

It does what the operators of a real federation do, in order: create the CA and the SuperLink
certificate, generate every silo's node key in that silo's own directory, start the SuperLink with
TLS and node authentication, admit each silo's public key, start the silos, and submit runs with
``flwr run``. Everything it starts is stopped on exit, on Ctrl-C and on failure.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.errors import UserError
from silotune.processes import ProcessGroup

PROGRESS_PREFIX = "SILOTUNE-ROUND "
DONE_PREFIX = "SILOTUNE-DONE "
CONNECTION = "silotune-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_dir() -> Path:
    """The Flower App directory (holds pyproject.toml with [tool.flwr.app])."""
    env = os.environ.get("SILOTUNE_APP_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent)
    for c in candidates:
        if (c / "pyproject.toml").exists() and "[tool.flwr.app]" in (c / "pyproject.toml").read_text():
            return c
    raise UserError(
        "cannot find the SiloTune Flower App (pyproject.toml with [tool.flwr.app]); "
        "run from a source checkout or set SILOTUNE_APP_DIR"
    )


def format_run_config(values: dict[str, Any]) -> str:
    """``{"peft.rank": 8, "model.name": "x"}`` -> Flower's --run-config TOML string."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, int | float):
            parts.append(f"{k}={v!r}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)


@dataclass
class SiloSpec:
    name: str
    data_path: Path
    node_config: dict[str, Any] = field(default_factory=dict)  # extra SiloConfig keys (dashed)


@dataclass
class RunResult:
    rounds: list[dict[str, Any]]
    adapter_dir: str
    log: str
    returncode: int


class LocalFederation:
    """Context manager: ``with LocalFederation(ws, silos) as fed: fed.submit({...})``."""

    def __init__(
        self, workspace: Path, silos: list[SiloSpec], insecure: bool = False, run_domain: str = "finance"
    ) -> None:
        self.ws = Path(workspace).resolve()
        self.silos = silos
        self.insecure = insecure
        self.run_domain = run_domain
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.group = ProcessGroup()
        self.flwr_home = self.ws / "central" / "flwr-home"
        self.ca_dir = self.ws / "central" / "ca"
        self.server_dir = self.ws / "central" / "server"
        self.events_dir = self.ws / "central" / "events"
        self.runs_root = self.ws / "central" / "runs"

    # -- identity -----------------------------------------------------------------------------
    def create_identity(self) -> None:
        from certs.node_key import generate_node_key
        from certs.pki import create_ca, issue_server_cert

        if self.insecure:
            return
        if not (self.ca_dir / "ca.crt").exists():
            create_ca(self.ca_dir)
        if not (self.server_dir / "server.pem").exists():
            issue_server_cert(self.ca_dir, self.server_dir, dns_names=["localhost"], ips=["127.0.0.1"])
        for s in self.silos:
            if not self.public_key(s).exists():
                generate_node_key(self.silo_dir(s) / "keys", s.name)

    def silo_dir(self, silo: SiloSpec) -> Path:
        return self.ws / "silos" / silo.name

    def private_key(self, silo: SiloSpec) -> Path:
        return self.silo_dir(silo) / "keys" / f"{silo.name}.key"

    def public_key(self, silo: SiloSpec) -> Path:
        return self.silo_dir(silo) / "keys" / f"{silo.name}.pub"

    # -- processes ----------------------------------------------------------------------------
    def start(self) -> None:
        from silo_node.launch import SiloOptions, start_silo
        from silotune.flwr_connection import write_connection
        from superlink.admission import admit_silo
        from superlink.launch import SuperLinkOptions, start_superlink

        self.create_identity()
        opts = SuperLinkOptions(
            ca_cert=None if self.insecure else self.ca_dir / "ca.crt",
            server_cert=None if self.insecure else self.server_dir / "server.pem",
            server_key=None if self.insecure else self.server_dir / "server.key",
            host="127.0.0.1",
            port=self.port,
            database=self.ws / "central" / "state.db",
            events_dir=self.events_dir,
            flwr_home=self.flwr_home,
            insecure=self.insecure,
        )
        self.runs_root.mkdir(parents=True, exist_ok=True)
        # Relative run dirs of the ServerApp land in the central workspace, not in our cwd.
        os.environ["SILOTUNE_RUNS_ROOT"] = str(self.runs_root)
        self.group.add(start_superlink(opts, self.ws / "logs" / "superlink.log", cwd=self.ws / "central"))
        write_connection(
            self.flwr_home,
            CONNECTION,
            self.address,
            None if self.insecure else self.ca_dir / "ca.crt",
            insecure=self.insecure,
        )
        if not self.insecure:
            for s in self.silos:
                admit_silo(
                    self.silo_dir(s) / "keys" / f"{s.name}.pub", s.name, self.flwr_home, connection=CONNECTION
                )
        for s in self.silos:
            node_config = {"data-path": str(s.data_path), "name": s.name, **s.node_config}
            sopts = SiloOptions(
                superlink=self.address,
                node_config=node_config,
                ca_cert=None if self.insecure else self.ca_dir / "ca.crt",
                node_key=None if self.insecure else self.private_key(s),
                insecure=self.insecure,
                runtime_port=free_port(),
                events_dir=self.silo_dir(s) / "events",
                flwr_home=self.silo_dir(s) / "flwr-home",
            )
            self.group.add(
                start_silo(sopts, self.ws / "logs" / f"silo-{s.name}.log", run_domain=self.run_domain)
            )

    def stop(self) -> None:
        self.group.stop_all()

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- runs ---------------------------------------------------------------------------------
    def submit(
        self,
        run_config: dict[str, Any],
        timeout: float = 1800.0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> RunResult:
        """``flwr run`` the app with ``run_config`` overrides, streaming its log until it ends."""
        from silotune.flwr_connection import flwr_env

        argv = [
            "flwr",
            "run",
            str(app_dir()),
            CONNECTION,
            "--stream",
            "--run-config",
            format_run_config(run_config),
        ]
        proc = subprocess.Popen(
            argv,
            env=flwr_env(self.flwr_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines_q: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # a thread, so that waiting for a line never blocks our checks
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines_q.put(raw)
            lines_q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        rounds: list[dict[str, Any]] = []
        adapter, lines, failed = "", [], False
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"the run did not finish within {timeout:.0f} s; logs: {self.ws / 'logs'}"
                    )
                self.group.check()  # a dead SuperLink or silo ends the wait with its name and log
                try:
                    line = lines_q.get(timeout=1.0)
                except queue.Empty:
                    continue
                if line is None:
                    break
                lines.append(line)
                if on_line:
                    on_line(line)
                if PROGRESS_PREFIX in line:
                    info = json.loads(line.split(PROGRESS_PREFIX, 1)[1])
                    rounds.append(info)
                    if on_round:
                        on_round(info)
                elif DONE_PREFIX in line:
                    adapter = line.split("adapter=", 1)[1].strip()
                    break  # the run is over; Flower's log stream lingers for a while
                elif "SiloTune run failed" in line:
                    failed = True
                    break
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if failed:
            raise UserError("the run failed:\n" + "".join(lines[-20:]))
        return RunResult(rounds, adapter, "".join(lines), proc.returncode or 0)
