"""deploy/docker/healthcheck.py: the images' HEALTHCHECK, compose and Kubernetes probes."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "docker" / "healthcheck.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code = 200 if self.path == "/metrics" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"silotune_up 1\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def metrics_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _check(role: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), role],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_exporter_healthy(metrics_port: int) -> None:
    res = _check("exporter", SILOTUNE_EXPORTER_PORT=str(metrics_port))
    assert res.returncode == 0 and "healthy" in res.stdout


def test_exporter_down() -> None:
    res = _check("exporter", SILOTUNE_EXPORTER_PORT=str(_free_port()))
    assert res.returncode == 1 and "unhealthy" in res.stdout


def test_superlink_down() -> None:
    res = _check("superlink", SILOTUNE_SUPERLINK_PORT=str(_free_port()))
    assert res.returncode == 1


def _fake_proc(root: Path, *commands: list[str]) -> Path:
    """A /proc with one numbered entry per command (cmdline NUL-separated, as the kernel writes it)."""
    for pid, argv in enumerate(commands, start=100):
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir(exist_ok=True)  # non-numeric entries are skipped
    return root


def test_supernode_needs_the_process(metrics_port: int, tmp_path: Path) -> None:
    # A listening port alone is not enough: the flower-supernode process must be running.
    others = _fake_proc(tmp_path / "without", ["/usr/bin/python3", "-m", "http.server"])
    res = _check(
        "supernode", SILOTUNE_SUPERNODE_RUNTIME_PORT=str(metrics_port), SILOTUNE_HEALTH_PROC=str(others)
    )
    assert res.returncode == 1
    running = _fake_proc(
        tmp_path / "with",
        ["/usr/bin/python3", "/usr/local/bin/flower-supernode", "--root-certificates", "ca.pem"],
    )
    res = _check(
        "supernode", SILOTUNE_SUPERNODE_RUNTIME_PORT=str(metrics_port), SILOTUNE_HEALTH_PROC=str(running)
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # ... and the process without its Runtime API port is not healthy either.
    res = _check(
        "supernode", SILOTUNE_SUPERNODE_RUNTIME_PORT=str(_free_port()), SILOTUNE_HEALTH_PROC=str(running)
    )
    assert res.returncode == 1


def test_role_from_environment(metrics_port: int) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"SILOTUNE_HEALTH_ROLE": "exporter", "SILOTUNE_EXPORTER_PORT": str(metrics_port)},
    )
    assert res.returncode == 0


def test_unknown_role() -> None:
    res = _check("bogus")
    assert res.returncode == 1 and "unknown role" in res.stderr
