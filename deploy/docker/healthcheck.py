"""Container health check: is this container's one long-lived process serving?

Run by the images' HEALTHCHECK (and by compose / Kubernetes probes) as
``python healthcheck.py superlink|supernode|exporter``. Standard library only, so it works even
when the application's own imports are broken. Exit 0 = healthy, 1 = unhealthy.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _process_running(name: str) -> bool:
    # SILOTUNE_HEALTH_PROC lets tests point at a fake process table: on a shared host the real
    # one may hold another flower-supernode, which a container's own /proc never does.
    for proc in Path(os.environ.get("SILOTUNE_HEALTH_PROC", "/proc")).iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(arg.decode(errors="replace")).name == name for arg in cmdline[:2]):
            return True
    return False


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def check(role: str) -> bool:
    if role == "superlink":
        # Loopback liveness only: the certificate names the public address, not 127.0.0.1, and
        # checking the certificate chain here would prove nothing about what silos see.
        port = int(os.environ.get("SILOTUNE_SUPERLINK_PORT", "8000"))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        scheme = "http" if os.environ.get("SILOTUNE_INSECURE") == "1" else "https"
        return _http_ok(f"{scheme}://127.0.0.1:{port}/health", ctx if scheme == "https" else None)
    if role == "supernode":
        # The SuperNode has no HTTP health endpoint; it is healthy while it runs and serves its
        # Runtime API (127.0.0.1:9094) to the ClientApp processes it starts.
        port = int(os.environ.get("SILOTUNE_SUPERNODE_RUNTIME_PORT", "9094"))
        return _process_running("flower-supernode") and _tcp_open("127.0.0.1", port)
    if role == "exporter":
        port = int(os.environ.get("SILOTUNE_EXPORTER_PORT", "9464"))
        return _http_ok(f"http://127.0.0.1:{port}/metrics")
    print(f"unknown role {role!r}; use superlink, supernode or exporter", file=sys.stderr)
    return False


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SILOTUNE_HEALTH_ROLE", "")
    ok = check(role)
    print(f"{role}: {'healthy' if ok else 'unhealthy'}")
    sys.exit(0 if ok else 1)
