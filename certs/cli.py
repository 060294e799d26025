"""`silotune certs ...`: the federation CA, the SuperLink certificate, silo node keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from certs.node_key import generate_node_key
from certs.pki import CA_CERT, create_ca, issue_server_cert, rotate_server_cert
from certs.show import show_path


def _ca(args: argparse.Namespace) -> int:
    ca = create_ca(Path(args.out), name=args.name, days=args.days, force=args.force)
    print(f"CA certificate: {ca.cert_path}   (give this to every silo and CLI user)")
    print(f"CA private key: {ca.key_path}   (mode 0600; keep it offline, never share it)")
    print(f"CA SHA-256 fingerprint: {ca.fingerprint}")
    print("Silos should compare this fingerprint out of band before trusting the CA file.")
    return 0


def _server(args: argparse.Namespace) -> int:
    sc = issue_server_cert(
        Path(args.ca_dir), Path(args.out), args.dns, args.ip, days=args.days, force=args.force,
        include_loopback=not args.no_loopback,
    )  # fmt: skip
    _print_server(sc.cert_path, sc.key_path, sc.dns_names, sc.ips, sc.backups)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    sc = rotate_server_cert(
        Path(args.ca_dir), Path(args.server_dir), args.dns or None, args.ip or None, days=args.days
    )
    _print_server(sc.cert_path, sc.key_path, sc.dns_names, sc.ips, sc.backups)
    print("Restart the SuperLink to serve the new certificate; silos need no change (same CA).")
    return 0


def _print_server(cert, key, dns, ips, backups) -> None:  # type: ignore[no-untyped-def]
    print(f"server certificate: {cert}")
    print(f"server private key: {key}   (mode 0600)")
    sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
    print(f"SANs: {', '.join(sans)}")
    for b in backups:
        print(f"previous file kept as: {b}")


def _node_key(args: argparse.Namespace) -> int:
    nk = generate_node_key(Path(args.out), name=args.name, force=args.force)
    print(f"private node key: {nk.private_path}   (mode 0600; stays at this silo)")
    print(f"public node key:  {nk.public_path}   (send this file to the federation operator)")
    print(f"public key: {nk.public_key}")
    print(f"fingerprint: {nk.fingerprint}")
    return 0


def _show(args: argparse.Namespace) -> int:
    for p in args.paths:
        print(show_path(Path(p)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("certs", help="federation CA, SuperLink certificate, silo node keys")
    sub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    ca = sub.add_parser("ca", help="create the federation CA (ca.crt, ca.key)")
    ca.add_argument("--out", required=True, help="directory for ca.crt and ca.key")
    ca.add_argument("--name", default="SiloTune Federation CA", help="CA common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    ca.add_argument("--force", action="store_true", help="replace existing files (kept as .bak)")
    ca.set_defaults(func=_ca)

    srv = sub.add_parser("server", help="issue the SuperLink TLS certificate (server.pem/.key)")
    srv.add_argument("--ca-dir", required=True, help=f"directory holding {CA_CERT} and ca.key")
    srv.add_argument("--out", required=True, help="directory for server.pem and server.key")
    srv.add_argument("--dns", nargs="*", default=[], metavar="NAME", help="DNS names silos use")
    srv.add_argument("--ip", nargs="*", default=[], metavar="IP", help="IP addresses silos use")
    srv.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    srv.add_argument(
        "--no-loopback",
        action="store_true",
        help="do not add IP 127.0.0.1 (the SuperLink's own runtime connects to it; keep it)",
    )
    srv.add_argument("--force", action="store_true", help="replace existing files (kept as .bak)")
    srv.set_defaults(func=_server)

    rot = sub.add_parser("rotate-server", help="reissue the server certificate with a new key (same SANs)")
    rot.add_argument("--ca-dir", required=True, help=f"directory holding {CA_CERT} and ca.key")
    rot.add_argument("--server-dir", required=True, help="directory holding server.pem/.key")
    rot.add_argument("--dns", nargs="*", default=[], metavar="NAME", help="replace DNS SANs")
    rot.add_argument("--ip", nargs="*", default=[], metavar="IP", help="replace IP SANs")
    rot.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    rot.set_defaults(func=_rotate)

    nk = sub.add_parser("node-key", help="generate this silo's node key pair (run AT the silo)")
    nk.add_argument("--out", required=True, help="directory for NAME.key and NAME.pub")
    nk.add_argument("--name", default="silo", help="file name and key comment (default silo)")
    nk.add_argument("--force", action="store_true", help="replace existing files (kept as .bak)")
    nk.set_defaults(func=_node_key)

    show = sub.add_parser("show", help="subject, SANs, expiry and fingerprints of certs/keys")
    show.add_argument("paths", nargs="+", metavar="PATH")
    show.set_defaults(func=_show)
