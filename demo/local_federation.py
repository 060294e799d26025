"""A whole federation on one machine, as real separate processes: the demo and the tests use it.

It does what the operators of a real federation do, in order: create the CA and the SuperLink
certificate, generate every silo's node key in that silo's own directory, start the SuperLink with
TLS and node authentication, admit each silo's public key, start the silos, and submit runs with
``flwr run``. Everything it starts is stopped on exit, on Ctrl-C and on failure.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.processes import ProcessGroup
from superlink.ops.submit import RunResult, submit_run

CONNECTION = "silotune-local"
# The policy each silo gets when its node config names none: the local federation's base models
# are directories on this machine (the tests' tiny models, `--model PATH`), which a silo refuses by
# default (silo_node/app/policy.py allow-local-paths); embedded models are allowed either way.
LOCAL_MODELS_POLICY = (
    "# written by demo/local_federation.py: base models in local directories\nallow-local-paths = true\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SiloSpec:
    name: str
    data_path: Path
    node_config: dict[str, Any] = field(default_factory=dict)  # extra SiloConfig keys (dashed)


class LocalFederation:
    """Context manager: ``with LocalFederation(ws, silos) as fed: fed.submit({...})``."""

    def __init__(
        self,
        workspace: Path,
        silos: list[SiloSpec],
        insecure: bool = False,
        run_domain: str = "finance",
        executor: str = "resident",
        proxy: bool = True,
        policy: str | None = LOCAL_MODELS_POLICY,
        proxy_limits: Any = None,
    ) -> None:
        self.ws = Path(workspace).resolve()
        self.silos = silos
        self.insecure = insecure
        self.run_domain = run_domain
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # the public (Fleet-only) address the silos use
        self.internal_port = free_port()  # the SuperLink itself, behind the proxy
        self.group = ProcessGroup()
        self.flwr_home = self.ws / "central" / "flwr-home"
        self.ca_dir = self.ws / "central" / "ca"
        self.server_dir = self.ws / "central" / "server"
        self.events_dir = self.ws / "central" / "events"
        self.runs_root = self.ws / "central" / "runs"
        self.journal = self.ws / "central" / "journal"  # submitted runs, resumed on restart
        self.executor = executor  # "resident" worker or Flower's "per-message" flwr-clientapp
        # False: the SuperLink alone on the public port (`--no-proxy`; benchmarks/proxy_overhead.py).
        self.proxy = proxy
        # The text of the policy file written for every silo whose node config names no
        # policy-file; None: such silos run under the default policy.
        self.policy = policy
        self.proxy_limits = proxy_limits  # superlink.ops.proxy.ProxyLimits; None: sized by default

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
        from silo_node.ops.launch import SiloOptions, start_silo
        from silotune.flwr_connection import write_connection
        from superlink.ops.admission import admit_silo
        from superlink.ops.launch import SuperLinkOptions, operator_address, start_superlink

        self.create_identity()
        opts = SuperLinkOptions(
            ca_cert=None if self.insecure else self.ca_dir / "ca.crt",
            server_cert=None if self.insecure else self.server_dir / "server.pem",
            server_key=None if self.insecure else self.server_dir / "server.key",
            host="127.0.0.1",
            port=self.port,
            internal_port=self.internal_port,
            proxy=self.proxy,
            database=self.ws / "central" / "state.db",
            events_dir=self.events_dir,
            flwr_home=self.flwr_home,
            insecure=self.insecure,
            proxy_limits=self.proxy_limits,
        )
        self.runs_root.mkdir(parents=True, exist_ok=True)
        # Relative run dirs of the ServerApp land in the central workspace, not in our cwd.
        os.environ["SILOTUNE_RUNS_ROOT"] = str(self.runs_root)
        self.group.add(start_superlink(opts, self.ws / "logs" / "superlink.log", cwd=self.ws / "central"))
        # The operator's commands (admit, run, ls) go to the SuperLink's loopback port: the public
        # port is the Fleet-only proxy, which refuses the Control API, as at a real central site.
        write_connection(
            self.flwr_home,
            CONNECTION,
            operator_address(opts),
            None if self.insecure else self.ca_dir / "ca.crt",
            insecure=self.insecure,
        )
        if not self.insecure:
            for s in self.silos:
                admit_silo(
                    self.silo_dir(s) / "keys" / f"{s.name}.pub", s.name, self.flwr_home, connection=CONNECTION
                )
        from silo_node.app.allotment import available_cpus

        # One machine, several silos: each gets its share of the cores (torch would take them all).
        threads = max(1, available_cpus() // max(1, len(self.silos)))
        for s in self.silos:
            node_config = self.silo_node_config(s)
            sopts = SiloOptions(
                superlink=self.address,
                node_config=node_config,
                ca_cert=None if self.insecure else self.ca_dir / "ca.crt",
                node_key=None if self.insecure else self.private_key(s),
                insecure=self.insecure,
                runtime_port=free_port(),
                events_dir=self.silo_dir(s) / "events",
                flwr_home=self.silo_dir(s) / "flwr-home",
                executor=self.executor,
                threads=threads,
            )
            self.group.add(
                start_silo(sopts, self.ws / "logs" / f"silo-{s.name}.log", run_domain=self.run_domain)
            )

    def silo_node_config(self, s: SiloSpec) -> dict[str, Any]:
        """The silo's node config; with this federation's policy file when it names none."""
        node_config = {"data-path": str(s.data_path), "name": s.name, **s.node_config}
        if self.policy is not None and not node_config.get("policy-file"):
            policy_file = self.silo_dir(s) / "policy.toml"
            policy_file.parent.mkdir(parents=True, exist_ok=True)
            policy_file.write_text(self.policy, encoding="utf-8")
            node_config["policy-file"] = str(policy_file)
        return node_config

    def resume_interrupted_runs(self) -> list[str]:
        """Re-submit the runs a crash of this workspace's central site interrupted (run_journal.py),
        as `silotune superlink start` does; start() does not (the demo starts its run over)."""
        from superlink.ops.run_journal import resume_open_runs

        return resume_open_runs(self.journal, self.flwr_home, CONNECTION)

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
        """Submit a run to this federation; a dead SuperLink or silo ends the wait at once."""
        return submit_run(
            self.flwr_home,
            CONNECTION,
            run_config,
            timeout,
            on_round,
            on_line,
            check=self.group.check,
            logs_hint=self.ws / "logs",
            journal=self.journal,
        )
