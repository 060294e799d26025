"""Start one silo's SuperNode: verified TLS to the SuperLink, signed requests with the node key.

The silo's settings (data path, domain, rank, column mapping, ...) travel to the ClientApp as
Flower's ``--node-config``. They are validated, and the data checked, BEFORE connecting, so a silo
with a typo in its data path fails here with a clear message instead of in round 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silo_node.ops.clock_check import diagnose_clock
from silotune.addresses import split_host_port
from silotune.config import SiloConfig, parse_silo_config
from silotune.errors import UserError
from silotune.flwr_connection import flower_env
from silotune.processes import ManagedProcess, python_in_netns, start_process

# Node-config keys that name files: made absolute, since the ClientApp runs in another process.
_PATH_KEYS = ("data-path", "state-dir", "policy-file")


@dataclass(frozen=True)
class SiloOptions:
    superlink: str  # HOST:PORT, as in the SuperLink certificate's SANs
    node_config: dict[str, Any] = field(default_factory=dict)  # dashed SiloConfig keys
    ca_cert: Path | None = None
    node_key: Path | None = None
    insecure: bool = False  # plaintext, no node auth: development only, asked for by name
    runtime_port: int | None = None  # local Runtime API port (default 9094); one per SuperNode
    events_dir: Path | None = None
    # Where Flower installs the app bundles (FABs) it receives; default ~/.flwr.
    flwr_home: Path | None = None
    max_wait_time: float | None = None  # give up connecting after this many seconds
    # "resident": a long-lived worker serves the SuperNode's tasks with the installed SiloTune code
    # (silo_node/ops/worker.py); "per-message": Flower's own flower-superexec, which starts a fresh
    # flwr-clientapp per message. Both authenticate to the Runtime API with the silo's secret.
    executor: str = "resident"
    threads: int | None = None  # torch threads for training (default: affinity / cgroup quota)
    gpus: str | None = None  # CUDA devices, e.g. "0,1" (default: the visible ones; "" = none)


def format_node_config(config: dict[str, Any]) -> str:
    """Render ``{key: value}`` as Flower's ``--node-config`` string (TOML values, space separated).

    Flower splits on ``key=value`` tokens where a value is a bare word or a quoted string without
    its own quote character, so a string may contain either kind of quote, but not both.
    """
    parts = []
    for key, value in config.items():
        if not key or any(c.isspace() or c == "=" for c in key):
            raise UserError(f"node config key {key!r} must not contain spaces or '='")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        else:
            text = str(value)
            if '"' not in text:
                rendered = '"' + text.replace("\\", "\\\\") + '"'
            elif "'" not in text:
                rendered = f"'{text}'"  # TOML literal string: no escapes needed
            else:
                raise UserError(f"node config {key}: a value cannot contain both ' and \" quotes")
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def _looks_local(value: str) -> bool:
    # data-path may also be a hub dataset id ("org/name"): leave those as they are.
    p = Path(value).expanduser()
    return p.exists() or value.startswith(("/", ".", "~")) or bool(p.suffix)


def prepare_node_config(config: dict[str, Any]) -> tuple[dict[str, Any], SiloConfig]:
    """Drop unset values, make paths absolute, validate with SiloConfig (errors name the key)."""
    cleaned = {k.replace("_", "-"): v for k, v in config.items() if v is not None and v != ""}
    for key in _PATH_KEYS:
        if key in cleaned and _looks_local(str(cleaned[key])):
            cleaned[key] = str(Path(str(cleaned[key])).expanduser().resolve())
    return cleaned, parse_silo_config(cleaned, source="silo settings")


def check_data(silo: SiloConfig, run_domain: str | None) -> None:
    """The lead's data checker (silo_node.app.data); raises DataError with a message to act on."""
    from silo_node.app.data import check_silo_data  # lazy: pulls in datasets/pandas
    from silotune.config import RunConfig

    # The silo's own domain wins; else the run's; else the run config's default.
    check_silo_data(silo, silo.domain or run_domain or RunConfig().domain)


def build_supernode_argv(opts: SiloOptions, node_config: dict[str, Any]) -> list[str]:
    """The `flower-supernode` command line; refuses plaintext unless ``insecure`` is set."""
    argv = ["flower-supernode", "--superlink", _check_address(opts.superlink)]
    if opts.insecure:
        if opts.node_key is not None:
            raise UserError(
                "node authentication needs TLS: drop --node-key, or drop --insecure and pass --ca"
            )
        argv.append("--insecure")
    else:
        if opts.ca_cert is None:
            raise UserError(
                "give the federation CA certificate with --ca ca.crt (it verifies the SuperLink); "
                "plaintext only with an explicit --insecure"
            )
        if opts.node_key is None:
            raise UserError(
                "give this silo's private node key with --node-key (create it with "
                "`silotune certs node-key`; send only the .pub to the federation operator)"
            )
        for p in (opts.ca_cert, opts.node_key):
            if not Path(p).is_file():
                raise UserError(f"{p} not found")
        argv += [
            "--root-certificates", str(Path(opts.ca_cert).resolve()),
            "--auth-supernode-private-key", str(Path(opts.node_key).resolve()),
        ]  # fmt: skip
    if opts.runtime_port is not None:
        argv += ["--port", str(opts.runtime_port)]
    # Both executors run beside the SuperNode (silo_node/ops/supervisor.py), which spawns nothing: only
    # with --isolation process does Flower authenticate its Runtime API (silo_node/app/runtime_auth.py).
    argv += ["--isolation", "process"]
    if opts.max_wait_time is not None:
        argv += ["--max-wait-time", str(opts.max_wait_time)]
    if node_config:
        argv += ["--node-config", format_node_config(node_config)]
    return argv


def default_state_dir(flwr_home: Path) -> Path:
    """Where a silo keeps its audit log and approvals when no state-dir is given."""
    return Path(flwr_home).resolve().parent / "state"


PER_MESSAGE_WARNING = (
    "WARNING: silo {name}: --executor per-message gives up app pinning: Flower starts whatever app "
    "the SuperLink sends, and this silo's policy (models, limits, trust-remote-code), approvals "
    "and audit log apply only if that app is SiloTune's own. Use the default resident executor "
    "to refuse other apps."
)


def check_policy(silo: SiloConfig, opts: SiloOptions) -> None:
    """Load the silo's policy (a bad file fails here, naming the key) and check the federation's CA."""
    from silo_node.app.policy import POLICY_ENV, check_federation, load_policy

    path = silo.policy_file or os.environ.get(POLICY_ENV, "")
    policy = load_policy(path)
    check_federation(policy, None if opts.insecure else opts.ca_cert, path)
    if opts.executor == "per-message" and (policy.allowed_apps or policy.require_approval):
        # Flower's per-message executor runs whatever app the SuperLink sends, in a fresh process:
        # no app pinning (only the resident worker checks the FAB hash), and the policy gate and
        # approvals run only if that app is SiloTune's own. A policy that relies on them must
        # not silently lose them.
        raise UserError(
            f"silo {silo.name}: --executor per-message runs any app the SuperLink sends and cannot "
            f"enforce this policy's {'allowed-apps' if policy.allowed_apps else 'require-approval'} "
            f"({path}); use the default resident executor"
        )
    if opts.executor == "per-message":
        import sys

        print(PER_MESSAGE_WARNING.format(name=silo.name), file=sys.stderr, flush=True)


def _check_address(address: str) -> str:
    split_host_port(address, "--superlink", "superlink.example.org:8000")
    return address


def supernode_env(opts: SiloOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    from silo_node.app.allotment import resolve

    env = flower_env(opts.flwr_home, opts.events_dir, base)
    # The allotment reaches whatever trains: the worker, or Flower's flwr-clientapp children.
    env.update(resolve(opts.threads, opts.gpus).env())
    return env


EXECUTORS = ("resident", "per-message")


def resident_argv(
    opts: SiloOptions, supernode_argv: list[str], silo: SiloConfig, secret: Path | None = None
) -> list[str]:
    """The supervisor command that runs the SuperNode and its executor together: the resident
    worker, or (``--executor per-message``) Flower's flower-superexec. With ``secret`` both the
    SuperNode and the executor get the Runtime API secret's path (silo_node/app/runtime_auth.py)."""
    import json
    import sys

    address = f"127.0.0.1:{opts.runtime_port or 9094}"
    if opts.executor == "per-message":
        beside = Path(sys.executable).with_name("flower-superexec")
        superexec = str(beside) if beside.exists() else shutil.which("flower-superexec") or "flower-superexec"
        worker = [superexec, "--insecure", "--runtime-api-address", address]  # loopback, no TLS
    else:
        worker = [sys.executable, "-m", "silo_node.ops.worker", "--runtime-api-address", address]
        if silo.policy_file:
            worker += ["--policy", silo.policy_file]
        if silo.state_dir:
            worker += ["--state-dir", silo.state_dir]
    if secret is not None:
        worker += ["--superexec-auth-secret-file", str(secret)]
        supernode_argv = [*supernode_argv, "--superexec-auth-secret-file", str(secret)]
    supernode = [shutil.which(supernode_argv[0]) or supernode_argv[0], *supernode_argv[1:]]
    return [
        sys.executable, "-m", "silo_node.ops.supervisor",
        "--supernode", json.dumps(supernode), "--worker", json.dumps(worker),
    ]  # fmt: skip


def diagnose_tls(address: str, ca_cert: Path | None, timeout: float = 5.0) -> str | None:
    """Why this silo's connection would fail at the TLS layer, in words; None if TLS is fine.

    An unreachable SuperLink returns None: the SuperNode retries, and the SuperLink may come later.
    ``ca_cert=None`` means the silo would connect in plaintext (--insecure).
    """
    host, port = split_host_port(address, "--superlink", "superlink.example.org:8000")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with sock:
        if ca_cert is None:
            probe = ssl.create_default_context()
            probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
            try:
                with probe.wrap_socket(sock, server_hostname=host):
                    return (
                        f"the SuperLink at {address} requires TLS but this silo was started with "
                        "--insecure (plaintext); drop --insecure and pass --ca with the "
                        "federation CA certificate"
                    )
            except (ssl.SSLError, OSError):
                return None
        ctx = ssl.create_default_context(cafile=str(ca_cert))
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            msg = exc.verify_message or str(exc)
            if "mismatch" in msg:
                return (
                    f"the SuperLink's certificate is not valid for {host!r} ({msg}); connect with "
                    "a name or IP listed in its SANs (`silotune certs show server.pem`), or have "
                    f"the operator reissue it with `silotune certs rotate-server --dns/--ip {host}`"
                )
            return (
                f"the SuperLink's certificate is not signed by the CA in {ca_cert} ({msg}); get "
                "the federation's ca.crt from the operator and compare its SHA-256 fingerprint "
                "(`silotune certs show ca.crt`)"
            )
        except ssl.SSLError as exc:
            if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc):
                return (
                    f"the SuperLink at {address} does not speak TLS (started with --insecure?); "
                    "ask the operator to start it with TLS"
                )
            return f"TLS handshake with {address} failed: {exc}"
        except OSError:
            return None


def diagnose_connection(address: str, ca_cert: Path | None) -> str | None:
    """``diagnose_tls``, then, over TLS (where node authentication is always on), whether this
    machine's clock is inside the window Flower accepts signed requests in."""
    problem = diagnose_tls(address, ca_cert)
    if problem is None and ca_cert is not None:
        problem = diagnose_clock(address, ca_cert)
    return problem


def diagnose_connection_in_netns(netns: str, address: str, ca_cert: Path | None) -> str | None:
    code = (
        "import sys; from pathlib import Path; from silo_node.ops.launch import diagnose_connection;"
        " ca = sys.argv[2] or None;"
        " print(diagnose_connection(sys.argv[1], Path(ca) if ca else None) or '')"
    )
    res = python_in_netns(netns, code, [address, str(ca_cert or "")], timeout=30)
    return res.stdout.strip() or None


def start_silo(
    opts: SiloOptions,
    log_path: Path | None,
    run_domain: str | None = None,
    check: bool = True,
    netns: str | None = None,
    name: str | None = None,
    preflight: bool = True,
) -> ManagedProcess:
    """Validate settings, check the data (unless ``check`` is False), check TLS, start the node.

    ``preflight`` turns a wrong CA, a SAN mismatch, plaintext-vs-TLS or a clock outside Flower's
    node-auth window into one clear error here; the SuperNode itself would only log retries, or
    (clock) exit without a reason.
    """
    config = dict(opts.node_config)
    if not config.get("state-dir") and not config.get("state_dir") and opts.flwr_home is not None:
        config["state-dir"] = str(default_state_dir(opts.flwr_home))  # audit log and approvals
    node_config, silo = prepare_node_config(config)
    check_policy(silo, opts)
    if check:
        check_data(silo, run_domain)
    argv = build_supernode_argv(opts, node_config)
    if preflight:
        ca = None if opts.insecure else opts.ca_cert
        if netns:
            problem = diagnose_connection_in_netns(netns, opts.superlink, ca)
        else:
            problem = diagnose_connection(opts.superlink, ca)
        if problem:
            raise UserError(f"silo {silo.name}: {problem}")
    if opts.events_dir is not None:
        Path(opts.events_dir).mkdir(parents=True, exist_ok=True)
    label = name or f"SuperNode {silo.name}"
    if opts.executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, not {opts.executor!r}")
    from silo_node.app.runtime_auth import ensure_secret, settings_env

    # The Runtime API secret lives beside the audit log (0600, made once); a silo without a state
    # dir (tests that start bare silos) gets a fresh one in a private temporary directory.
    private = Path(silo.state_dir) if silo.state_dir else Path(tempfile.mkdtemp(prefix="silotune-silo-"))
    argv = resident_argv(opts, argv, silo, ensure_secret(private))
    env = supernode_env(opts)
    env.update(settings_env(node_config))  # the ClientApp's settings: never the task's context
    return start_process(label, argv, log_path, env=env, netns=netns)
