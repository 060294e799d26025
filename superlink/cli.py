"""`silotune superlink start` and `silotune silos admit|list|remove` (central site)."""

from __future__ import annotations

import argparse
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


def _start(args: argparse.Namespace) -> int:
    from monitoring.cli import parse_bind, supervise_with_exporter
    from superlink.launch import SuperLinkOptions, build_superlink_argv, start_superlink

    ws = resolve_workspace(args.workspace)
    opts = SuperLinkOptions(
        ca_cert=_pick(args.ca, args.certs_dir, "ca.crt"),
        server_cert=_pick(args.cert, args.certs_dir, "server.pem"),
        server_key=_pick(args.key, args.certs_dir, "server.key"),
        host=args.host,
        port=args.port,
        database=Path(args.database) if args.database else ws / "superlink" / "state.db",
        events_dir=Path(args.events_dir) if args.events_dir else ws / "events",
        flwr_home=ws / "superlink" / "flwr-home",
        insecure=args.insecure,
    )
    argv = build_superlink_argv(opts)  # refuses before anything starts
    if args.exporter:
        parse_bind(args.exporter)  # a bad address fails before the SuperLink starts
    if args.insecure:
        print("WARNING: --insecure: plaintext HTTP and no node authentication (development only)")
    log = Path(args.log_file) if args.log_file else None
    print("starting:", " ".join(argv))
    proc = start_superlink(opts, log, wait_timeout=args.ready_timeout)
    print(f"SuperLink ready on {args.host}:{args.port} (state: {opts.database})")
    if log:
        print(f"log: {log}")
    rc = supervise_with_exporter(proc, args.exporter, opts.events_dir, "server", ws / "exporter.log")
    return 0 if rc in (0, 130, 3, -15) else rc  # 3 = Flower's graceful SIGTERM exit


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
    from superlink.admission import admit_silo

    silo = admit_silo(Path(args.public_key), args.name, _flwr_home(args))
    print(f"admitted {silo.name}: node id {silo.node_id}, key fingerprint {silo.fingerprint}")
    print("Check this fingerprint with the silo's operator (it printed it when making the key).")
    return 0


def _list(args: argparse.Namespace) -> int:
    from superlink.admission import list_silos

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
    from superlink.admission import remove_silo

    node_id = remove_silo(args.silo, _flwr_home(args))
    print(f"removed node {node_id}; its key can no longer connect")
    return 0


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", help="SuperLink HOST:PORT (saved for later commands)")
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
    st.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    st.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    st.add_argument("--database", help="state database (default <workspace>/superlink/state.db)")
    st.add_argument("--events-dir", help="SILOTUNE_EVENTS_DIR (default <workspace>/events)")
    st.add_argument("--log-file", help="write the SuperLink's output here instead of the terminal")
    st.add_argument("--workspace", help="SiloTune workspace (default ./.silotune)")
    st.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for /health")
    add_exporter_option(st, "server")
    st.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext HTTP and NO node authentication; development only",
    )
    st.set_defaults(func=_start)

    silos = subparsers.add_parser("silos", help="admit, list and remove silos (node keys)")
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
