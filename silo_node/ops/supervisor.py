"""One silo = flower-supernode (--isolation process) + the resident worker, started and stopped together.

(With ``--executor per-message`` the "worker" is Flower's flower-superexec; both hold the Runtime
API secret, silo_node/app/runtime_auth.py.)

This small process is what `silotune silo start` and LocalFederation manage as "the silo": it
starts the SuperNode and the worker as its children, restarts the worker when it dies (a crash, an
OOM kill, SIGKILL mid-round) with bounded backoff, and ends the worker when the SuperNode exits,
exiting with the SuperNode's code (the launcher explains Flower's exit codes from the log). On
SIGTERM it stops both. Both children write to this process's output (the silo's log).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from types import FrameType

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # a worker that lived this long resets the backoff


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def supervise(supernode_argv: list[str], worker_argv: list[str], max_restarts: int = 1000) -> int:
    """Run both until the SuperNode exits or we are told to stop; returns the exit code to use."""
    stopping = False

    def _term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    node = subprocess.Popen(supernode_argv, stdin=subprocess.DEVNULL)
    worker: subprocess.Popen[bytes] | None = None
    backoff, started, restarts, next_start = BACKOFF_START, 0.0, 0, 0.0
    try:
        while not stopping:
            rc = node.poll()
            if rc is not None:
                print(f"[silotune] SuperNode exited with code {rc}; stopping the worker", flush=True)
                return rc
            now = time.monotonic()
            if worker is not None and worker.poll() is not None:
                print(f"[silotune] worker exited with code {worker.returncode}; restarting in {backoff:.0f}s",
                      flush=True)  # fmt: skip
                worker, next_start = None, now + backoff
                backoff = BACKOFF_START if now - started > HEALTHY_AFTER else min(backoff * 2, BACKOFF_MAX)
            if worker is None and now >= next_start:
                if restarts > max_restarts:
                    print("[silotune] worker keeps dying; giving up", flush=True)
                    return 1
                worker, started = subprocess.Popen(worker_argv, stdin=subprocess.DEVNULL), now
                restarts += 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(worker)
        _stop(node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m silo_node.ops.supervisor")
    parser.add_argument("--supernode", required=True, help="JSON list: the flower-supernode command")
    parser.add_argument("--worker", required=True, help="JSON list: the worker command")
    args = parser.parse_args(argv)
    return supervise(json.loads(args.supernode), json.loads(args.worker))


if __name__ == "__main__":
    sys.exit(main())
