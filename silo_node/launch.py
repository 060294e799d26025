"""Start one silo's SuperNode: verified TLS to the SuperLink, signed requests with the node key.

The silo's settings (data path, domain, rank, column mapping, ...) travel to the ClientApp as
Flower's ``--node-config``. They are validated, and the data checked, BEFORE connecting, so a silo
with a typo in its data path fails here with a clear message instead of in round 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.config import SiloConfig, parse_silo_config
from silotune.errors import UserError
from silotune.events import EVENTS_DIR_ENV
from silotune.processes import ManagedProcess, start_process

# Node-config keys that name files: made absolute, since the ClientApp runs in another process.
_PATH_KEYS = ("data-path", "state-dir")


@dataclass(frozen=True)
class SiloOptions:
    superlink: str  # HOST:PORT, as in the SuperLink certificate's SANs
    node_config: dict[str, Any] = field(default_factory=dict)  # dashed SiloConfig keys
    ca_cert: Path | None = None
    node_key: Path | None = None
    insecure: bool = False  # plaintext, no node auth: development only, asked for by name
    runtime_port: int | None = None  # local Runtime API port (default 9094); one per SuperNode
    events_dir: Path | None = None
    max_wait_time: float | None = None  # give up connecting after this many seconds


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


def prepare_node_config(config: dict[str, Any]) -> tuple[dict[str, Any], SiloConfig]:
    """Drop unset values, make paths absolute, validate with SiloConfig (errors name the key)."""
    cleaned = {k.replace("_", "-"): v for k, v in config.items() if v is not None and v != ""}
    for key in _PATH_KEYS:
        if key in cleaned:
            cleaned[key] = str(Path(str(cleaned[key])).expanduser().resolve())
    return cleaned, parse_silo_config(cleaned, source="silo settings")


def check_data(silo: SiloConfig, run_domain: str | None) -> None:
    """The lead's data checker (silo_node.data); raises DataError with a message to act on."""
    from silo_node.data import check_silo_data  # lazy: pulls in datasets/pandas

    check_silo_data(silo, run_domain)


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
    if opts.max_wait_time is not None:
        argv += ["--max-wait-time", str(opts.max_wait_time)]
    if node_config:
        argv += ["--node-config", format_node_config(node_config)]
    return argv


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(
            f"--superlink {address!r}: expected HOST:PORT, e.g. superlink.example.org:8000"
        )
    return address


def supernode_env(opts: SiloOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if opts.events_dir is not None:
        env[EVENTS_DIR_ENV] = str(Path(opts.events_dir).resolve())
    return env


def start_silo(
    opts: SiloOptions,
    log_path: Path | None,
    run_domain: str | None = None,
    check: bool = True,
    netns: str | None = None,
    name: str | None = None,
) -> ManagedProcess:
    """Validate settings, check the data (unless ``check`` is False), then start the SuperNode."""
    node_config, silo = prepare_node_config(opts.node_config)
    if check:
        check_data(silo, run_domain)
    argv = build_supernode_argv(opts, node_config)
    if opts.events_dir is not None:
        Path(opts.events_dir).mkdir(parents=True, exist_ok=True)
    label = name or f"SuperNode {silo.name}"
    return start_process(label, argv, log_path, env=supernode_env(opts), netns=netns)
