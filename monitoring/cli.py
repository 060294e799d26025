"""`silotune exporter` (Prometheus endpoint over the event files) and `silotune report` (HTML)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from silotune.addresses import split_host_port
from silotune.errors import UserError
from silotune.metrics import BYTES_PER_MB, FLOWERTUNE_BUDGET_MB

if TYPE_CHECKING:  # for annotations only: the launch helpers import silotune.processes lazily
    from silotune.processes import ManagedProcess


def register(sub: Any) -> None:
    p = sub.add_parser(
        "exporter",
        help="serve Prometheus metrics from the event files of a SuperLink or silo",
        description="Tails <events-dir>/<role>.jsonl and serves /metrics. Numbers only: no "
        "prompts, text or paths are exported.",
    )
    p.add_argument("--events-dir", required=True, type=Path, help="$SILOTUNE_EVENTS_DIR of the apps")
    p.add_argument("--role", choices=["server", "silo"], required=True)
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"HOST:PORT (default {DEFAULT_BIND})")
    p.add_argument(
        "--budget-mb",
        type=float,
        default=FLOWERTUNE_BUDGET_MB,
        help="communication budget (1 MB = 1024**2 bytes, as FlowerTune) until a run states its "
        "own; default 200000",
    )
    p.add_argument(
        "--flwr-connection",
        default=None,
        help="SuperLink connection name in $FLWR_HOME/config.toml; enables the `flwr ls` "
        "wire-traffic poller (server role only)",
    )
    p.add_argument(
        "--flwr-home",
        type=Path,
        default=None,
        help="FLWR_HOME holding that connection (default: $FLWR_HOME, else ~/.flwr)",
    )
    p.add_argument("--flwr-poll-seconds", type=float, default=15.0)
    p.add_argument(
        "--flwr-command",
        default="flwr",
        help="the `flwr` program the poller runs (default: the one installed beside this SiloTune)",
    )
    p.set_defaults(func=run_exporter)

    r = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a run (no Grafana needed)",
    )
    r.add_argument("run_dir", type=Path, help="run directory holding events.jsonl")
    r.add_argument(
        "--silo-events",
        type=Path,
        action="append",
        default=[],
        help="a silo's silo.jsonl to include (repeatable)",
    )
    r.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report.html")
    r.set_defaults(func=run_report)


DEFAULT_BIND = "127.0.0.1:9464"


def add_exporter_option(p: argparse.ArgumentParser, role: str) -> None:
    """``--exporter [HOST:PORT]`` on the launchers: serve this site's metrics beside its process."""
    p.add_argument(
        "--exporter",
        nargs="?",
        const=DEFAULT_BIND,
        default=None,
        metavar="HOST:PORT",
        help=f"also run `silotune exporter --role {role}` on the events dir, stopped together "
        f"(default address {DEFAULT_BIND}; loopback unless you name another)",
    )


def start_exporter(events_dir: Path, role: str, bind: str, log_path: Path) -> ManagedProcess:
    """Start ``silotune exporter`` as a managed child process and wait until /metrics answers."""
    import urllib.request

    from silotune.processes import start_process

    host, port = parse_bind(bind)
    argv = [sys.executable, "-m", "command_line.main", "exporter", "--events-dir", str(events_dir),
            "--role", role, "--bind", bind]  # fmt: skip
    proc = start_process("exporter", argv, log_path)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/metrics"
    deadline = time.monotonic() + 30.0
    while True:  # bounded: the exporter answers within a second or two, or has failed
        proc.check()  # raises with the log's tail if it exited (e.g. the port is taken)
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our own local endpoint
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.stop()
                msg = f"--exporter {bind}: no answer from {url} within 30 s; see {log_path}"
                raise UserError(msg) from None
            time.sleep(0.3)


def supervise_with_exporter(
    proc: ManagedProcess, bind: str | None, events_dir: Path, role: str, log_path: Path
) -> int:
    """Run a site's Flower process in the foreground (``supervise``); with ``bind``, its exporter
    runs beside it. Both stop together, on exit, Ctrl-C, SIGTERM or an error starting the exporter."""
    from silotune.processes import supervise

    exporter = None
    try:
        if bind:
            exporter = start_exporter(events_dir, role, bind, log_path)
            print(f"metrics: http://{bind}/metrics (log: {log_path})")
        return supervise(proc)
    finally:
        proc.stop()
        if exporter is not None:
            exporter.stop()


def parse_bind(bind: str) -> tuple[str, int]:
    return split_host_port(bind, "--bind", "127.0.0.1:9464")


def run_exporter(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from monitoring.exporter import build_registry
    from monitoring.flwr_traffic import FlowerTrafficPoller

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, port = parse_bind(args.bind)
    if args.budget_mb < 0:
        raise UserError(f"--budget-mb {args.budget_mb}: must be >= 0 (0 = unlimited)")
    try:  # the apps create it too; a read-only mount (containers) is fine as it is
        args.events_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logging.warning("cannot create %s (%s); waiting for the apps to create it", args.events_dir, exc)
    poller = None
    if args.flwr_connection:
        if args.role != "server":
            raise UserError("--flwr-connection: only the central (--role server) exporter polls")
        poller = FlowerTrafficPoller(
            args.flwr_connection,
            interval_s=args.flwr_poll_seconds,
            flwr=args.flwr_command,
            flwr_home=args.flwr_home,
        )
    events_file = args.events_dir / f"{args.role}.jsonl"
    registry, _ = build_registry(
        events_file, args.role, args.budget_mb * BYTES_PER_MB, poller.collect if poller else None
    )
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UserError(f"--bind {args.bind}: cannot listen ({exc}); pick a free port") from exc
    if poller is not None:
        poller.start()
    logging.info("serving http://%s:%d/metrics from %s", host, port, events_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # timed wait: signals are handled promptly
        pass
    if poller is not None:
        poller.stop()
    server.shutdown()
    return 0


def run_report(args: argparse.Namespace) -> int:
    from monitoring.report import write_report

    out = write_report(args.run_dir, args.silo_events, args.out)
    print(out, file=sys.stdout)
    return 0
