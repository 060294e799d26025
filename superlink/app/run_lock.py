"""One ServerApp per run directory.

Two ServerApps writing the same run-dir would interleave checkpoints, LATEST and events, and a
resume would pick up a mix of both runs. The first ServerApp takes an exclusive ``flock`` on
``<run-dir>/run.lock`` and holds it for the run's life; a second one is refused with a message
naming the holder (pid, host, run id, since when), which the holder writes into the file.

``flock`` belongs to the open file, so the kernel releases it when the holder dies, however it
dies (SIGKILL, OOM, power loss): a stale lock file never blocks the next run, and its old text is
simply overwritten. Lock files on a network filesystem are only as good as its flock support; keep
run dirs on a local disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path
from types import TracebackType

from silotune.errors import UserError

LOCK_NAME = "run.lock"


class RunDirLocked(UserError, RuntimeError):
    """Another live ServerApp holds the run directory."""


class RunLock:
    """``with RunLock(run_dir, run_id):`` holds ``<run_dir>/run.lock`` exclusively, or raises."""

    def __init__(self, run_dir: Path, run_id: str = "") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirLocked(
                f"run-dir {self.path.parent} is in use by {holder}; two runs must not write the same "
                "checkpoints. Wait for it to end, stop it, or give this run another run-dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": self.run_id,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Empty the file first: the next reader of a free lock must not see us as its holder.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']} (run {h['run_id'] or '?'}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        # The holder took the lock but has not written its name yet (a few microseconds).
        return "another ServerApp (it has not written its pid yet)"


def held_by(run_dir: Path) -> dict | None:
    """The live holder of ``<run_dir>/run.lock`` as it wrote itself down, or None when it is free.

    Probes with a non-blocking flock that is released at once; a holder that has not written its
    name yet is reported as ``{}``."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                h = json.loads(os.pread(fd, 4096, 0))
                return h if isinstance(h, dict) else {}
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def stop_orphaned_holder(run_dir: Path, grace: float = 15.0) -> str | None:
    """Stop the ServerApp that a killed central site left holding ``run_dir``; say what was done.

    Called only when the central site starts, before it resumes the run: a SuperLink killed under
    its ServerApp can leave that ``flwr-serverapp`` alive (Flower does not stop it), still holding
    the run dir's lock, and the resumed run would be refused. No ServerApp of the restarted site
    exists yet, so a holder is a leftover. Only a holder on this host whose command line is
    ``flwr-serverapp`` is stopped (SIGTERM, then SIGKILL after ``grace`` s); anything else is left
    alone and reported. Returns None when the lock was free."""
    holder = held_by(run_dir)
    if holder is None:
        return None
    pid = int(holder.get("pid", 0) or 0)
    who = _describe(json.dumps(holder).encode()) if holder else "a ServerApp that wrote no name"
    if not pid or holder.get("host") != socket.gethostname():
        return f"run-dir {run_dir} is held by {who}, not on this host: not stopped"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    if not any(a.endswith(b"flwr-serverapp") for a in argv[:2]):
        return f"run-dir {run_dir} is held by {who}, which is not a flwr-serverapp: not stopped"
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and held_by(run_dir) is not None:
            time.sleep(0.2)
        if held_by(run_dir) is None:
            break
    if held_by(run_dir) is not None:
        return f"run-dir {run_dir} is still held by {who} after SIGKILL"
    return f"stopped the ServerApp left from before the restart: {who}"
