"""The silo's clock check: Flower's window, and the offset read from a real HTTPS Date header."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from certs.pki import create_ca, issue_server_cert
from silo_node.ops.clock_check import (
    MAX_AHEAD_S,
    MAX_BEHIND_S,
    clock_problem,
    diagnose_clock,
    superlink_clock_offset,
)


def test_window_matches_flower() -> None:
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE

    assert MAX_AHEAD_S == SYSTEM_TIME_TOLERANCE
    assert MAX_BEHIND_S == TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE


@pytest.mark.parametrize("ahead", [0.0, 4.9, -1.0, -304.0])
def test_inside_the_window_is_fine(ahead: float) -> None:
    assert clock_problem(ahead) is None


def test_outside_the_window_says_which_way_and_what_to_do() -> None:
    fast = clock_problem(5.0)
    assert fast and "5 s ahead of the SuperLink's" in fast and "NTP" in fast
    slow = clock_problem(-400.0)
    assert slow and "400 s behind the SuperLink's" in slow and "305 s" in slow


class _Server:
    """An HTTPS server whose Date header is ``shift`` seconds off real time (or absent)."""

    def __init__(self, tmp: Path) -> None:
        create_ca(tmp / "ca")
        issue_server_cert(tmp / "ca", tmp / "srv", [], ["127.0.0.1"])
        self.ca = tmp / "ca" / "ca.crt"
        self.shift: float | None = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self.send_response_only(404)
                if outer.shift is not None:
                    self.send_header("Date", formatdate(time.time() + outer.shift, usegmt=True))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp / "srv" / "server.pem", tmp / "srv" / "server.key")
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if not self.thread.is_alive():
            return  # already closed by the test
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(tmp_path)
    try:
        yield srv
    finally:
        srv.close()


def test_offset_from_the_date_header(server: _Server) -> None:
    offset = superlink_clock_offset(server.address, server.ca)
    assert offset is not None and abs(offset) <= 1.5
    assert diagnose_clock(server.address, server.ca) is None

    server.shift = -60.0  # the SuperLink's clock reads a minute earlier: this silo is ahead
    offset = superlink_clock_offset(server.address, server.ca)
    assert offset is not None and 58.5 <= offset <= 61.5
    problem = diagnose_clock(server.address, server.ca)
    assert problem and "ahead of the SuperLink's" in problem

    server.shift = 60.0  # this silo a minute behind: inside Flower's 305 s
    assert diagnose_clock(server.address, server.ca) is None
    server.shift = 600.0
    problem = diagnose_clock(server.address, server.ca)
    assert problem and "behind the SuperLink's" in problem


def test_unmeasurable_is_not_an_error(server: _Server, tmp_path: Path) -> None:
    server.shift = None  # no Date header
    assert superlink_clock_offset(server.address, server.ca) is None
    create_ca(tmp_path / "other")  # TLS fails: diagnose_tls explains that case, not this check
    assert superlink_clock_offset(server.address, tmp_path / "other" / "ca.crt") is None
    port = server.httpd.server_address[1]
    server.close()
    assert superlink_clock_offset(f"127.0.0.1:{port}", server.ca, timeout=2) is None
