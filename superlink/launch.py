"""Start the federation's SuperLink: TLS, node authentication, persistent state, air-gap settings.

`build_superlink_argv` is pure (tested without processes); `start_superlink` runs it through
silotune.processes so the SuperLink and its `flower-superexec` child are stopped together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from silotune.errors import UserError
from silotune.flwr_connection import flower_env
from silotune.processes import ManagedProcess, start_process, wait_for_superlink


@dataclass(frozen=True)
class SuperLinkOptions:
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    host: str = "0.0.0.0"  # multi-host: silos connect from other machines
    port: int = 8000
    database: Path | None = Path("superlink-state.db")
    events_dir: Path | None = None
    # Where Flower installs the app bundles (FABs) it receives; default ~/.flwr.
    flwr_home: Path | None = None
    log_file: Path | None = None
    node_auth: bool = True
    # Plaintext without node authentication; development only, and only when asked for by name.
    insecure: bool = False


def _abs(path: Path | None) -> str:
    return str(Path(path).expanduser().resolve())  # type: ignore[arg-type]


def build_superlink_argv(opts: SuperLinkOptions) -> list[str]:
    """The `flower-superlink` command line for ``opts``; refuses unsafe or incomplete settings."""
    argv = ["flower-superlink"]
    if opts.insecure:
        argv.append("--insecure")
    else:
        missing = [
            flag
            for flag, value in (
                ("--ca", opts.ca_cert),
                ("--cert", opts.server_cert),
                ("--key", opts.server_key),
            )
            if value is None
        ]
        if missing:
            raise UserError(
                f"TLS needs {', '.join(missing)} (create them with `silotune certs ca` and "
                "`silotune certs server`); plaintext only with an explicit --insecure"
            )
        for value in (opts.ca_cert, opts.server_cert, opts.server_key):
            if not Path(value).is_file():  # type: ignore[arg-type]
                raise UserError(f"{value} not found")
        # Absolute paths: the process may run with another working directory (or in a netns).
        argv += [
            "--ssl-ca-certfile", _abs(opts.ca_cert),
            "--ssl-certfile", _abs(opts.server_cert),
            "--ssl-keyfile", _abs(opts.server_key),
        ]  # fmt: skip
        if opts.node_auth:
            argv.append("--enable-supernode-auth")
    if opts.database is not None:
        argv += ["--database", _abs(opts.database)]
    if opts.log_file is not None:
        argv += ["--log-file", _abs(opts.log_file)]
    # Dependencies are baked into the environment/image; no `uv sync` (air-gapped sites).
    argv.append("--disable-runtime-dependency-installation")
    argv += ["--host", opts.host, "--port", str(opts.port)]
    return argv


def superlink_env(opts: SuperLinkOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    return flower_env(opts.flwr_home, opts.events_dir, base)


def start_superlink(
    opts: SuperLinkOptions,
    log_path: Path,
    netns: str | None = None,
    wait_timeout: float | None = 60.0,
    health_address: str | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start the SuperLink; by default wait until /health answers (over TLS, checked with the CA).

    ``health_address`` is the HOST:PORT to probe, with full hostname verification; by default the
    bound address (127.0.0.1 for 0.0.0.0) is probed, verifying the certificate chain only.
    """
    argv = build_superlink_argv(opts)
    if opts.database is not None:
        Path(opts.database).parent.mkdir(parents=True, exist_ok=True)
    if opts.events_dir is not None:
        Path(opts.events_dir).mkdir(parents=True, exist_ok=True)
    proc = start_process("SuperLink", argv, log_path, env=superlink_env(opts), cwd=cwd, netns=netns)
    if wait_timeout:
        local = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
        try:
            wait_for_superlink(
                health_address or f"{local}:{opts.port}",
                None if opts.insecure else opts.ca_cert,
                timeout=wait_timeout,
                process=proc,
                netns=netns,
                # Our own child on a local address: verify the chain, not the name.
                check_hostname=health_address is not None,
            )
        except BaseException:
            proc.stop()
            raise
    return proc
