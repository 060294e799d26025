"""`silotune superlink start` and `silotune silos admit|list|remove` (central site)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from monitoring.cli import add_exporter_option
from silotune.errors import UserError
from silotune.flwr_connection import (
    DEFAULT_CONNECTION,
    read_connection,
    resolve_flwr_home,
    resolve_workspace,
    write_connection,
)


def _pick(explicit: str | None, certs_dir: str | None, name: str) -> Path | None:
    if explicit:
        return Path(explicit)
    return Path(certs_dir) / name if certs_dir else None


def _size(text: str | None) -> int | None:
    from superlink.ops.proxy import parse_size

    return parse_size(text) if text else None


def _limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter-size",
        metavar="SIZE",
        help="the largest adapter the federation's runs send, as sent (e.g. 40MiB; a run's "
        "silo_result.uplink_bytes): sizes the proxy's request-body limit and deadline "
        "(default: Flower's largest object, 5 MiB, plus 1 MiB)",
    )
    p.add_argument(
        "--max-request-size",
        metavar="SIZE",
        help="the proxy's request-body limit itself (e.g. 8MiB); larger bodies get 413 before they "
        "reach the SuperLink (default: from --adapter-size)",
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _start(args: argparse.Namespace) -> int:
    from monitoring.cli import parse_bind, supervise_with_exporter
    from superlink.ops.launch import (
        SuperLinkOptions,
        build_superlink_argv,
        operator_address,
        proxy_access_log_path,
        proxy_log_path,
        start_superlink,
    )

    ws = resolve_workspace(args.workspace)
    log = Path(args.log_file) if args.log_file else None
    # The proxy's access log: --proxy-access-log, else beside --log-file, else in the workspace.
    access_log = Path(args.proxy_access_log) if args.proxy_access_log else None
    if access_log is None and log is None:
        access_log = ws / "superlink" / "proxy-access.log"
    opts = SuperLinkOptions(
        ca_cert=_pick(args.ca, args.certs_dir, "ca.crt"),
        server_cert=_pick(args.cert, args.certs_dir, "server.pem"),
        server_key=_pick(args.key, args.certs_dir, "server.key"),
        host=args.host,
        port=args.port,
        internal_port=args.internal_port,
        proxy=not args.no_proxy,
        database=Path(args.database) if args.database else ws / "superlink" / "state.db",
        events_dir=Path(args.events_dir) if args.events_dir else ws / "events",
        flwr_home=ws / "superlink" / "flwr-home",
        access_log=not args.no_proxy_access_log,
        access_log_path=access_log,
        insecure=args.insecure,
        adapter_bytes=_size(args.adapter_size),
        max_request_bytes=_size(args.max_request_size),
    )
    argv = build_superlink_argv(opts)  # refuses before anything starts
    if args.exporter:
        parse_bind(args.exporter)  # a bad address fails before the SuperLink starts
    if args.insecure:
        print("WARNING: --insecure: plaintext HTTP and no node authentication (development only)")
    if args.no_proxy and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"WARNING: --no-proxy: the Control API (admit/remove silos, run code at every silo) is "
            f"served unauthenticated on {args.host}:{args.port} (development only)"
        )
    print("starting:", " ".join(argv))
    # A SIGTERM while starting must stop what already started (the SuperLink, its proxy: each in
    # its own session, they would outlive us): raise like Ctrl-C, which start_superlink cleans up.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    proc = start_superlink(opts, log, wait_timeout=args.ready_timeout)
    operator = operator_address(opts)
    if opts.proxy:
        print(f"Fleet API (silos) on {args.host}:{args.port} through the proxy; Control API on "
              f"{operator} only")  # fmt: skip
    print(f"SuperLink ready on {operator} (state: {opts.database})")
    # Operator commands on this host (`silotune silos ...`, `flwr run/ls/log/stop`) use loopback.
    home = resolve_flwr_home(None, ws)
    write_connection(home, DEFAULT_CONNECTION, operator, None if args.insecure else opts.ca_cert,
                     insecure=args.insecure)  # fmt: skip
    print(f"operator connection '{DEFAULT_CONNECTION}' -> {operator} saved in {home}")
    if log:
        print(f"log: {log}" + (f" (proxy: {proxy_log_path(log)})" if opts.proxy else ""))
    if opts.proxy:
        from superlink.ops.launch import proxy_limits

        lim = proxy_limits(opts)
        print(f"Fleet proxy bounds: request bodies up to {lim.max_request_bytes} B (413 beyond), "
              f"requests within {lim.request_timeout_s:g} s, {lim.client_requests_per_s} requests/s "
              f"per client address (burst {lim.client_burst}), "
              f"{lim.max_connections} connections")  # fmt: skip
    access = proxy_access_log_path(opts, log)
    if access is not None:
        print(f"Fleet proxy access log (every request on {args.host}:{args.port}): {access}")
    if not args.no_resume:
        _resume_interrupted_runs(proc, ws, home)
    rc = supervise_with_exporter(proc, args.exporter, opts.events_dir, "server", ws / "exporter.log")
    return 0 if rc in (0, 130, 3, -15) else rc  # 3 = Flower's graceful SIGTERM exit


def _resume_interrupted_runs(proc: object, ws: Path, home: Path) -> None:
    """Runs submitted with `silotune run` that a crash interrupted continue from their last
    checkpoint (superlink/ops/run_journal.py)."""
    from superlink.ops.run_journal import journal_dir, resume_open_runs

    try:
        resume_open_runs(journal_dir(ws), home, DEFAULT_CONNECTION)
    except BaseException:
        proc.stop()  # type: ignore[attr-defined]
        raise


def _flwr_home(args: argparse.Namespace) -> Path:
    home = resolve_flwr_home(args.flwr_home, args.workspace)
    if args.superlink:
        if not args.ca and not args.insecure:
            raise UserError("--superlink needs --ca CA.crt (or an explicit --insecure)")
        write_connection(
            home, DEFAULT_CONNECTION, args.superlink, Path(args.ca) if args.ca else None,
            insecure=args.insecure,
        )  # fmt: skip
    else:
        read_connection(home, DEFAULT_CONNECTION)  # clear error if never configured
    return home


def _admit(args: argparse.Namespace) -> int:
    from superlink.ops.admission import admit_silo

    silo = admit_silo(Path(args.public_key), args.name, _flwr_home(args))
    print(f"admitted {silo.name}: node id {silo.node_id}, key fingerprint {silo.fingerprint}")
    print("Check this fingerprint with the silo's operator (it printed it when making the key).")
    return 0


def _list(args: argparse.Namespace) -> int:
    from superlink.ops.admission import list_silos

    silos = list_silos(_flwr_home(args))
    if not silos:
        print("no silos admitted")
        return 0
    print(f"{'NAME':<20} {'NODE ID':<22} {'STATUS':<12} {'ONLINE SINCE':<22} FINGERPRINT")
    for s in silos:
        print(
            f"{s.name or '-':<20} {s.node_id:<22} {s.status:<12} {s.online_at or '-':<22} "
            f"{s.fingerprint or '-'}"
        )
    return 0


def _remove(args: argparse.Namespace) -> int:
    from superlink.ops.admission import remove_silo

    node_id = remove_silo(args.silo, _flwr_home(args))
    print(f"removed node {node_id}; its key can no longer connect")
    return 0


SILOS_DESCRIPTION = """\
Admit, list and remove silos. Run these on the central host: the SuperLink's public port
serves the Fleet API (silos) only and answers 403 to these commands; they use the SuperLink's
loopback address (127.0.0.1:<internal port>, default public port + 1), which
`silotune superlink start` saves as the workspace's connection.

A remote operator tunnels to that loopback port over SSH, e.g.
  ssh -N -L 8001:127.0.0.1:8001 operator@central-host
  silotune silos list --superlink 127.0.0.1:8001 --ca ca.crt
(the server certificate carries the SAN 127.0.0.1, so TLS verification holds through the tunnel).
"""


def _proxy(args: argparse.Namespace) -> int:
    from silotune.addresses import split_host_port
    from silotune.processes import supervise
    from superlink.ops.launch import start_fleet_proxy
    from superlink.ops.proxy import STDOUT, ProxyLimits, ProxyOptions, check_loopback_san

    host, port = split_host_port(args.listen, "--listen", "0.0.0.0:8000")
    tls = not args.insecure
    ca, cert, key = (_pick(a, args.certs_dir, n) for a, n in (
        (args.ca, "ca.crt"), (args.cert, "server.pem"), (args.key, "server.key")))  # fmt: skip
    if tls:
        if None in (ca, cert, key):
            raise UserError("the proxy needs --certs-dir (or --ca, --cert, --key); "
                            "plaintext only with an explicit --insecure")  # fmt: skip
        check_loopback_san(cert)  # type: ignore[arg-type]
    log = Path(args.log_file) if args.log_file else None
    # The access log: --access-log, else beside --log-file, else standard output (a container's log).
    access_log = Path(args.access_log) if args.access_log else None
    if access_log is None:
        access_log = log.with_name(log.stem + "-access.log") if log else STDOUT
    limits = ProxyLimits.for_adapter(_size(args.adapter_size), max_request_bytes=_size(args.max_request_size))
    popts = ProxyOptions(listen_host=host, listen_port=port, upstream_port=args.upstream_port,
                         ca_cert=ca if tls else None, server_cert=cert if tls else None,
                         server_key=key if tls else None,
                         access_log=None if args.no_access_log else access_log,
                         limits=limits)  # fmt: skip
    proc, config_dir = start_fleet_proxy(popts, log)
    print(f"Fleet proxy on {host}:{port} -> SuperLink 127.0.0.1:{args.upstream_port} "
          "(only /v1/fleet/* and /health are forwarded)")  # fmt: skip
    try:
        rc = supervise(proc)
    finally:
        import shutil

        shutil.rmtree(config_dir, ignore_errors=True)
    return 0 if rc in (0, 130, -15) else rc


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--superlink",
        help="the SuperLink's loopback HOST:PORT, e.g. 127.0.0.1:8001 (saved for later commands; "
        "`superlink start` saves it for you)",
    )
    p.add_argument("--ca", help="federation CA certificate used to verify the SuperLink")
    p.add_argument("--insecure", action="store_true", help="plaintext (development only)")
    p.add_argument("--workspace", help="SiloTune workspace (default ./.silotune)")
    p.add_argument("--flwr-home", help="FLWR_HOME to use (default <workspace>/flwr-home)")


def register(subparsers: argparse._SubParsersAction) -> None:
    sl = subparsers.add_parser("superlink", help="run the federation's SuperLink")
    sub = sl.add_subparsers(dest="superlink_command", metavar="ACTION", required=True)
    st = sub.add_parser("start", help="start flower-superlink with TLS and node authentication")
    st.add_argument("--certs-dir", help="directory with ca.crt, server.pem, server.key")
    st.add_argument("--ca", help="CA certificate (overrides --certs-dir)")
    st.add_argument("--cert", help="server certificate (overrides --certs-dir)")
    st.add_argument("--key", help="server private key (overrides --certs-dir)")
    st.add_argument("--host", default="0.0.0.0", help="public listen address for silos (default 0.0.0.0)")
    st.add_argument("--port", type=int, default=8000, help="public (Fleet API) port (default 8000)")
    st.add_argument(
        "--internal-port",
        type=int,
        help="the SuperLink's own port on 127.0.0.1, for operators (default: --port + 1)",
    )
    st.add_argument(
        "--no-proxy",
        action="store_true",
        help="no Fleet proxy: the SuperLink binds --host:--port with its Control API exposed "
        "(development only)",
    )
    st.add_argument("--database", help="state database (default <workspace>/superlink/state.db)")
    st.add_argument("--events-dir", help="SILOTUNE_EVENTS_DIR (default <workspace>/events)")
    st.add_argument("--log-file", help="write the SuperLink's output here instead of the terminal")
    st.add_argument(
        "--proxy-access-log",
        metavar="PATH",
        help="the Fleet proxy's access log, one JSON line per request on the public port, refused "
        "ones included; no bodies or credentials (default: beside --log-file as "
        "<stem>-proxy-access.log, else <workspace>/superlink/proxy-access.log)",
    )
    st.add_argument("--no-proxy-access-log", action="store_true", help="keep no proxy access log")
    _limit_args(st)
    st.add_argument("--workspace", help="SiloTune workspace (default ./.silotune)")
    st.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for /health")
    st.add_argument(
        "--no-resume",
        action="store_true",
        help="do not re-submit runs that a crash interrupted (default: they continue from their "
        "last checkpoint; see <workspace>/journal)",
    )
    add_exporter_option(st, "server")
    st.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext HTTP and NO node authentication; development only",
    )
    st.set_defaults(func=_start)

    px = sub.add_parser(
        "proxy",
        help="run only the Fleet proxy (Envoy) in front of a SuperLink on 127.0.0.1 (a sidecar)",
    )
    px.add_argument("--listen", default="0.0.0.0:8000", help="public HOST:PORT (default 0.0.0.0:8000)")
    px.add_argument("--upstream-port", type=int, default=8001,
                    help="the SuperLink's port on 127.0.0.1 (default 8001)")  # fmt: skip
    px.add_argument("--certs-dir", help="directory with ca.crt, server.pem, server.key")
    px.add_argument("--ca", help="CA certificate (overrides --certs-dir)")
    px.add_argument("--cert", help="server certificate (overrides --certs-dir)")
    px.add_argument("--key", help="server private key (overrides --certs-dir)")
    px.add_argument("--log-file", help="write Envoy's output here instead of the terminal")
    px.add_argument(
        "--access-log",
        metavar="PATH",
        help="one JSON line per request on the public port, refused ones included; no bodies or "
        "credentials; '-' for standard output (default: beside --log-file as <stem>-access.log, "
        "else standard output)",
    )
    px.add_argument("--no-access-log", action="store_true", help="keep no access log")
    _limit_args(px)
    px.add_argument("--insecure", action="store_true", help="plaintext on both hops (development only)")
    px.set_defaults(func=_proxy)

    silos = subparsers.add_parser(
        "silos",
        help="admit, list and remove silos (node keys)",
        description=SILOS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = silos.add_subparsers(dest="silos_command", metavar="ACTION", required=True)
    ad = ssub.add_parser("admit", help="register a silo's public node key under a name")
    ad.add_argument("public_key", metavar="KEY.pub", help="the silo's public key file")
    ad.add_argument("--name", required=True, help="silo name, e.g. hospital-a")
    _connection_args(ad)
    ad.set_defaults(func=_admit)
    ls = ssub.add_parser("list", help="admitted silos and whether they are online")
    _connection_args(ls)
    ls.set_defaults(func=_list)
    rm = ssub.add_parser("remove", help="unregister a silo (by name or node id)")
    rm.add_argument("silo", metavar="NAME|NODE_ID")
    _connection_args(rm)
    rm.set_defaults(func=_remove)
