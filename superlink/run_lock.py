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
