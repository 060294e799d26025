"""Start the federation's SuperLink: TLS, node authentication, persistent state, air-gap settings.

`build_superlink_argv` is pure (tested without processes); `start_superlink` runs it through
silotune.processes so the SuperLink and its `flower-superexec` child are stopped together.

By default the SuperLink binds 127.0.0.1:<internal port> and an Envoy proxy (superlink/ops/proxy.py)
listens on the public host:port, forwarding the Fleet API and /health only: Flower serves its
Control and Runtime APIs on the same port and does not authenticate Control callers. Both
processes start and stop together; ``proxy=False`` (`--no-proxy`) is for development only.

The proxy keeps an access log of every request on the public port, refused ones included (JSON
lines, superlink/ops/proxy.py ``ACCESS_LOG_FORMAT``): by default beside the SuperLink's log as
``<stem>-proxy-access.log``, or at ``access_log_path``; ``access_log=False`` turns it off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from silotune.admission_ledger import ADMISSIONS_ENV, LEDGER_FILE
from silotune.errors import UserError
from silotune.flwr_connection import flower_env
from silotune.processes import ManagedProcess, start_process, wait_for_superlink
from superlink.ops.proxy import (
    LOOPBACK,
    ProxyLimits,
    ProxyOptions,
    build_envoy_argv,
    check_loopback_san,
    write_envoy_config,
)


@dataclass(frozen=True)
class SuperLinkOptions:
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    host: str = "0.0.0.0"  # public address (the Fleet proxy's): silos connect from other machines
    port: int = 8000
    # The SuperLink itself binds 127.0.0.1:internal_port (default port + 1) behind the proxy.
    internal_port: int | None = None
    # False: no proxy, the SuperLink binds host:port with its Control API public (development only).
    proxy: bool = True
    database: Path | None = Path("superlink-state.db")
    events_dir: Path | None = None
    # Where Flower installs the app bundles (FABs) it receives; default ~/.flwr.
    flwr_home: Path | None = None
    log_file: Path | None = None
    # The Fleet proxy's access log (one JSON line per request on the public port): at
    # access_log_path, else beside the log file start_superlink is given; False: none.
    access_log: bool = True
    access_log_path: Path | None = None
    node_auth: bool = True
    # Plaintext without node authentication; development only, and only when asked for by name.
    insecure: bool = False
    # The proxy's bounds (superlink/ops/proxy.py ProxyLimits), sized from the run: the request-body
    # limit from the adapter's size as sent (None: the largest object Flower makes, 5 MiB), or
    # given; the request deadline follows the body limit. ``proxy_limits`` replaces them all.
    adapter_bytes: int | None = None
    max_request_bytes: int | None = None
    proxy_limits: ProxyLimits | None = None


def _abs(path: Path | None) -> str:
    return str(Path(path).expanduser().resolve())  # type: ignore[arg-type]


def internal_port(opts: SuperLinkOptions) -> int:
    return opts.internal_port if opts.internal_port is not None else opts.port + 1


def superlink_bind(opts: SuperLinkOptions) -> tuple[str, int]:
    """Where flower-superlink itself listens: loopback behind the proxy, else host:port."""
    return (LOOPBACK, internal_port(opts)) if opts.proxy else (opts.host, opts.port)


def operator_address(opts: SuperLinkOptions) -> str:
    """The address for operator commands (`silotune silos ...`, `flwr run/ls/log/stop`) on the
    central host: the SuperLink's loopback port (the public port refuses the Control API)."""
    host, port = superlink_bind(opts)
    return f"{LOOPBACK if host in ('0.0.0.0', '::', '') else host}:{port}"


def proxy_options(opts: SuperLinkOptions, log_path: Path | None = None) -> ProxyOptions:
    """The proxy in front of ``opts``' SuperLink; ``log_path`` is the SuperLink's log (the access
    log goes beside it unless ``opts`` names one)."""
    tls = not opts.insecure
    return ProxyOptions(
        listen_host=opts.host, listen_port=opts.port, upstream_port=internal_port(opts),
        ca_cert=opts.ca_cert if tls else None, server_cert=opts.server_cert if tls else None,
        server_key=opts.server_key if tls else None,
        access_log=proxy_access_log_path(opts, log_path), limits=proxy_limits(opts),
    )  # fmt: skip


def proxy_limits(opts: SuperLinkOptions) -> ProxyLimits:
    """The Fleet proxy's bounds for ``opts``: given, else sized from the adapter (or the body limit)."""
    if opts.proxy_limits is not None:
        return opts.proxy_limits
    return ProxyLimits.for_adapter(opts.adapter_bytes, max_request_bytes=opts.max_request_bytes)


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
        if opts.proxy:
            check_loopback_san(opts.server_cert)  # type: ignore[arg-type]
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
    if opts.proxy and internal_port(opts) == opts.port:
        raise UserError(f"the SuperLink's internal port must differ from the public port {opts.port}")
    host, port = superlink_bind(opts)
    argv += ["--host", host, "--port", str(port)]
    return argv


def superlink_env(opts: SuperLinkOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    env = flower_env(opts.flwr_home, opts.events_dir, base)
    # The ServerApp names silos by the admission ledger (superlink/ops/admission.py), never by what a
    # silo says. The ledger sits in the operator's FLWR_HOME: the SuperLink's own (demo, tests), or
    # <workspace>/flwr-home beside <workspace>/superlink/flwr-home (`silotune superlink start`).
    if opts.flwr_home is not None and not env.get(ADMISSIONS_ENV):
        home = Path(opts.flwr_home).expanduser().resolve()
        paths = [home / LEDGER_FILE]
        if home.parent.name == "superlink":
            paths.append(home.parent.parent / "flwr-home" / LEDGER_FILE)
        env[ADMISSIONS_ENV] = os.pathsep.join(str(p) for p in paths)
    return env


class ProxiedSuperLink(ManagedProcess):
    """The SuperLink and its Fleet proxy as one process: running while both run, stopped together.

    ``popen``, ``log_path`` and ``log_text()`` are the SuperLink's; the proxy is ``self.proxy``.
    """

    def __init__(self, superlink: ManagedProcess, proxy: ManagedProcess, config_dir: Path) -> None:
        super().__init__(superlink.name, superlink.popen, superlink.log_path)
        self.superlink, self.proxy, self._config_dir = superlink, proxy, config_dir

    def running(self) -> bool:
        return super().running() and self.proxy.running()

    def check(self) -> None:
        super().check()
        self.proxy.check()

    def stop(self, grace: float = 10.0) -> int | None:
        self.proxy.stop(grace=grace)  # first: no new requests reach a stopping SuperLink
        rc = super().stop(grace=grace)
        shutil.rmtree(self._config_dir, ignore_errors=True)
        return rc


def start_fleet_proxy(
    popts: ProxyOptions, log_path: Path | None, netns: str | None = None
) -> tuple[ManagedProcess, Path]:
    """Start Envoy with a config for ``popts`` (written to a fresh temporary folder)."""
    config_dir = Path(tempfile.mkdtemp(prefix="silotune-proxy-"))
    config = write_envoy_config(popts, config_dir / "envoy.json")
    try:
        proc = start_process("Fleet proxy", build_envoy_argv(config, popts), log_path, netns=netns)
    except BaseException:
        shutil.rmtree(config_dir, ignore_errors=True)
        raise
    return proc, config_dir


def proxy_log_path(log_path: Path | None) -> Path | None:
    return None if log_path is None else Path(log_path).with_name(Path(log_path).stem + "-proxy.log")


def access_log_beside(log_path: Path) -> Path:
    """``superlink.log`` -> ``superlink-proxy-access.log`` (beside ``superlink-proxy.log``)."""
    return Path(log_path).with_name(Path(log_path).stem + "-proxy-access.log")


def proxy_access_log_path(opts: SuperLinkOptions, log_path: Path | None) -> Path | None:
    """Where the Fleet proxy's access log goes: ``opts.access_log_path``, else beside
    ``log_path``; None when turned off, without a proxy, or with no place known."""
    if not (opts.proxy and opts.access_log):
        return None
    if opts.access_log_path is not None:
        return Path(opts.access_log_path)
    return None if log_path is None else access_log_beside(log_path)


def start_superlink(
    opts: SuperLinkOptions,
    log_path: Path,
    netns: str | None = None,
    wait_timeout: float | None = 60.0,
    health_address: str | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start the SuperLink (and its Fleet proxy); by default wait until /health answers on the
    public address (over TLS, checked with the CA).

    ``health_address`` is the HOST:PORT to probe, with full hostname verification; by default the
    public address (127.0.0.1 for 0.0.0.0) is probed, verifying the certificate chain only. The
    proxy logs beside ``log_path`` (``<stem>-proxy.log``), its access log too
    (``<stem>-proxy-access.log``, unless ``opts`` names another place or turns it off).
    """
    argv = build_superlink_argv(opts)
    if opts.database is not None:
        Path(opts.database).parent.mkdir(parents=True, exist_ok=True)
    if opts.events_dir is not None:
        Path(opts.events_dir).mkdir(parents=True, exist_ok=True)
    ca = None if opts.insecure else opts.ca_cert
    proc = start_process("SuperLink", argv, log_path, env=superlink_env(opts), cwd=cwd, netns=netns)
    try:
        if wait_timeout and opts.proxy:
            # Our own child on loopback: verify the chain, not the name.
            wait_for_superlink(operator_address(opts), ca, timeout=wait_timeout, process=proc,
                               netns=netns, check_hostname=False)  # fmt: skip
        if opts.proxy:
            popts = proxy_options(opts, log_path)
            proxy, config_dir = start_fleet_proxy(popts, proxy_log_path(log_path), netns)
            proc = ProxiedSuperLink(proc, proxy, config_dir)
        if wait_timeout:
            local = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
            wait_for_superlink(
                health_address or f"{local}:{opts.port}",
                ca,
                timeout=wait_timeout,
                process=proc,
                netns=netns,
                check_hostname=health_address is not None,
            )
    except BaseException:
        proc.stop()
        raise
    return proc
