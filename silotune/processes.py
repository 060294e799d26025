"""A small process manager for launchers, the demo and tests.

Each process runs in its own process group (session) with stdout+stderr appended to a log file,
optionally inside a network namespace. Stopping kills the whole group, because Flower's SuperLink
and SuperNode spawn `flower-superexec` children that outlive a plain kill of the parent. Every wait
is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from silotune.errors import UserError

# Flower exit codes worth explaining in one line (flwr.supercore.exit.exit_code).
_EXIT_MEANING = {
    104: "invalid arguments to the SuperLink",
    302: "the node key is not a valid EC private key in OpenSSH format",
    303: "a node key was given but TLS is off (node auth needs TLS)",
    305: "the SuperNode could not connect to the SuperLink, or was refused (unregistered key?)",
    600: "the address is not HOST:PORT",
    603: "--root-certificates cannot be combined with --insecure",
    604: "a path given on the command line does not exist",
    605: "the TLS server certificate/key/CA set is incomplete or invalid",
}


def _flower_exit_code(log_path: Path | None) -> int | None:
    if log_path is None:
        return None
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))  # the tail is enough; logs can be large
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    codes = re.findall(r"Exit Code: (\d+)", tail)
    return int(codes[-1]) if codes else None


class ProcessFailed(UserError):
    """A managed process exited when it should have been running."""

    def __init__(self, name: str, returncode: int, log_path: Path | None) -> None:
        self.name, self.returncode, self.log_path = name, returncode, log_path
        # Flower logs "Exit Code: 305" but the process may still exit with 1: trust the log.
        self.flower_code = _flower_exit_code(log_path) or returncode
        meaning = _EXIT_MEANING.get(self.flower_code)
        extra = f" (Flower exit code {self.flower_code}: {meaning})" if meaning else ""
        where = f"see its log: {log_path}" if log_path else "see its output above"
        super().__init__(f"{name} exited with code {returncode}{extra}; {where}")


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every process, read from /proc."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                # Fields after the parenthesised command name (which may contain spaces).
                fields = fh.read().rsplit(")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
        except (OSError, ValueError, IndexError):
            continue
    return table


def _family(leader: int, leader_reaped: bool) -> set[int]:
    """Live members of the leader's process group, plus its descendants while it is unreaped.

    Descendants are only trusted while the leader is unreaped (its pid cannot be reused then);
    they catch a child that moved to its own group.
    """
    table = _proc_table()
    pids = {pid for pid, (_, pgid, st) in table.items() if pgid == leader and st != "Z"}
    if not leader_reaped:
        frontier = {leader}
        for _ in range(64):  # bounded depth
            nxt = {p for p, (ppid, _, st) in table.items() if ppid in frontier and st != "Z"}
            nxt -= pids
            if not nxt:
                break
            pids |= nxt
            frontier = nxt
    pids.discard(os.getpid())
    return pids


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {p for p in pids if p in table and table[p][2] != "Z"}


def _signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class ManagedProcess:
    """One started process; ``stop()`` ends its whole process group and its descendants."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path | None) -> None:
        self.name, self.popen, self.log_path = name, popen, log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        """Raise ProcessFailed if the process has exited."""
        rc = self.popen.poll()
        if rc is not None:
            raise ProcessFailed(self.name, rc, self.log_path)

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for exit; raise TimeoutError if it is still running."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout:.0f}s") from None

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group (and stray descendants), wait ``grace`` s, then SIGKILL; reap.

        Returns once every member is gone (SIGKILL is delivered at once, but a process dies a
        moment later, later still under load), so callers may reuse its ports and files.
        """
        family = _family(self.pid, self.popen.returncode is not None)
        if family:
            _signal_pids(family, signal.SIGTERM)
            survivors = self._wait_gone(family, grace)
            _signal_pids(survivors, signal.SIGKILL)
            self._wait_gone(survivors, 5.0)
        try:
            return self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # unkillable (D state): report, do not hang
            return None

    def _wait_gone(self, pids: set[int], timeout: float) -> set[int]:
        """Wait up to ``timeout`` s for ``pids`` to exit; return those still alive."""
        deadline = time.monotonic() + timeout
        while True:
            self.popen.poll()  # reap the leader so it stops counting as alive
            pids = _alive(pids)
            if not pids or time.monotonic() >= deadline:
                return pids
            time.sleep(0.05)


def start_process(
    name: str,
    argv: Sequence[str],
    log_path: Path | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    netns: str | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session, output appended to ``log_path`` (None: inherit ours).

    With ``netns`` the command runs inside that network namespace.
    """
    full = list(argv)
    if netns:
        # `ip netns exec` execs the command in place, so the pid and group are the command's own.
        full = ["ip", "netns", "exec", netns, *full]
    log = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise UserError(f"cannot start {name}: {exc.filename} not found") from None
    finally:
        if log is not None:
            log.close()
    return ManagedProcess(name, popen, log_path)


class ProcessGroup:
    """Starts processes and stops all of them on exit, exceptions and Ctrl-C included."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        netns: str | None = None,
    ) -> ManagedProcess:
        proc = start_process(name, argv, log_path, env=env, cwd=cwd, netns=netns)
        self.processes.append(proc)
        return proc

    def add(self, proc: ManagedProcess) -> ManagedProcess:
        self.processes.append(proc)
        return proc

    def check(self) -> None:
        for proc in self.processes:
            proc.check()

    def stop_all(self, grace: float = 10.0) -> None:
        # Reverse order: clients (SuperNodes) before the server they talk to.
        for proc in reversed(self.processes):
            proc.stop(grace=grace)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def supervise(proc: ManagedProcess, poll: float = 1.0) -> int:
    """Run in the foreground until ``proc`` exits; Ctrl-C or SIGTERM stop its whole group.

    Returns the process's exit code (130 when interrupted). Used by `silotune ... start`.
    """

    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # same path as Ctrl-C, so the group is stopped below

    previous = signal.signal(signal.SIGTERM, _term)
    try:
        while True:
            try:
                return proc.popen.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                if not proc.running():  # a companion exited (the SuperLink's Fleet proxy)
                    return 1
                continue
    except KeyboardInterrupt:
        proc.stop()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.running():
            proc.stop()


def _ssl_context(ca_path: Path, check_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_path))
    # A local liveness probe on 127.0.0.1 may not be in the SANs; the chain is still verified.
    ctx.check_hostname = check_hostname
    return ctx


def probe_health(
    address: str, ca_path: Path | None, timeout: float = 2.0, check_hostname: bool = True
) -> bool:
    """One GET of the SuperLink's /health (HTTPS verified with ``ca_path``, HTTP if None)."""
    if ca_path is not None:
        ctx: ssl.SSLContext | None = _ssl_context(ca_path, check_hostname)
        url = f"https://{address}/health"
    else:
        ctx, url = None, f"http://{address}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_for_superlink(
    address: str,
    ca_path: Path | None,
    timeout: float = 60.0,
    process: ManagedProcess | None = None,
    netns: str | None = None,
    check_hostname: bool = True,
) -> None:
    """Poll /health until it answers 200; fail fast with ProcessFailed if ``process`` dies.

    With ``netns`` the probe runs inside that namespace (a lab address must never be contacted from
    the root namespace).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            process.check()
        if netns:
            code = (
                "import sys; from pathlib import Path; from silotune.processes import probe_health;"
                " ca = sys.argv[2] or None;"
                " ok = probe_health(sys.argv[1], Path(ca) if ca else None,"
                " check_hostname=sys.argv[3] == '1'); sys.exit(0 if ok else 1)"
            )
            args = [address, str(ca_path or ""), "1" if check_hostname else "0"]
            ok = python_in_netns(netns, code, args, timeout=15).returncode == 0
        else:
            ok = probe_health(address, ca_path, check_hostname=check_hostname)
        if ok:
            return
        time.sleep(0.5)
    if process is not None:
        process.check()
    raise UserError(
        f"SuperLink at {address} did not answer /health within {timeout:.0f}s"
        + (f"; see its log: {process.log_path}" if process is not None else "")
    )


def python_in_netns(
    netns: str, code: str, args: Sequence[str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code args...`` inside a network namespace (bounded by ``timeout``)."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", code, *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout:.0f}s")
