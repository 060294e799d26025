"""A lab of hosts in network namespaces, for multi-host tests on one machine.

Layout (docs/test-lab.md): a hub namespace holds a bridge; each host namespace has one veth whose
peer lives in the hub, so nothing but a blackhole route is created in the root namespace. Hosts get
198.18.<subnet>.<i>/24 (RFC 2544 test range) and no default route. The subnet is picked per lab so
that its blackhole route (a safety net: a stray connect from the root namespace fails at once)
never collides with another lab's. Teardown kills every process inside the lab's namespaces and
deletes them, also when the test failed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_unavailable_reason() -> str | None:
    """None when labs can be built here; otherwise why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"stprobe{secrets.token_hex(3)}"
    try:
        res = _ip("netns", "add", probe, check=False)
        if res.returncode != 0:
            return f"`ip netns add` fails here: {res.stderr.strip()}"
        if _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False).returncode:
            return "cannot create a bridge inside a network namespace"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str


class NetLab:
    """``with NetLab() as lab: h = lab.add_host("superlink")`` -> processes run with netns=h.netns."""

    def __init__(self) -> None:
        # Short unique prefix: namespace names show up in `ip netns list` and must not collide.
        self.prefix = f"st{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.hosts: dict[str, Host] = {}
        self.subnet: int | None = None
        self._route: str | None = None
        self._namespaces: list[str] = []

    # -- setup ---------------------------------------------------------------------------------
    def up(self) -> NetLab:
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        self._claim_subnet()
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _claim_subnet(self) -> None:
        # A blackhole route for our /24 in the root namespace; "File exists" means another lab
        # holds that subnet, so try another (bounded).
        for _ in range(50):
            subnet = 1 + secrets.randbelow(250)
            route = f"198.18.{subnet}.0/24"
            if _ip("route", "add", "blackhole", route, check=False).returncode == 0:
                self.subnet, self._route = subnet, route
                return
        raise RuntimeError("no free 198.18.x.0/24 subnet for the lab")

    def add_host(self, name: str, extra_ips: int = 0) -> Host:
        """A host namespace with ``eth0`` on the hub bridge; ``extra_ips`` more addresses."""
        assert self.subnet is not None, "call up() first"
        index = len(self.hosts) + 1
        if index + extra_ips > 120:
            raise ValueError("too many hosts for one lab")
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        peer = f"v{index}"  # lives in the hub namespace only, so short names cannot collide
        _ip("-n", self.hub, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
            "netns", ns)  # fmt: skip
        _ip("-n", self.hub, "link", "set", peer, "master", "br0", "up")
        ip = f"198.18.{self.subnet}.{index}"
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        for k in range(extra_ips):
            # Extra addresses from the top of the range (never handed to other hosts).
            _ip("-n", ns, "addr", "add", f"198.18.{self.subnet}.{200 + index * 4 + k}/24",
                "dev", "eth0")  # fmt: skip
        _ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(name, ns, ip)
        self.hosts[name] = host
        return host

    def extra_ip(self, host: Host, k: int = 0) -> str:
        index = list(self.hosts).index(host.name) + 1
        return f"198.18.{self.subnet}.{200 + index * 4 + k}"

    def link(self, host: Host, up: bool) -> None:
        """Cut or restore a host's link (fault injection)."""
        index = list(self.hosts).index(host.name) + 1
        _ip("-n", self.hub, "link", "set", f"v{index}", "up" if up else "down")

    # -- teardown ------------------------------------------------------------------------------
    def _pids(self, ns: str) -> set[int]:
        res = _ip("netns", "pids", ns, check=False)
        return {int(p) for p in res.stdout.split() if p.isdigit()}

    def down(self) -> None:
        """Kill every process in our namespaces (TERM, then KILL), delete them, drop the route."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids: set[int] = set()
            for ns in self._namespaces:
                pids |= self._pids(ns)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if os.path.exists(f"/proc/{p}")}
                time.sleep(0.1)
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        if self._route:
            _ip("route", "del", "blackhole", self._route, check=False)
            self._route = None

    def __enter__(self) -> NetLab:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()
