"""The silo's own record of what it did: an append-only audit log, and run approvals.

``<state-dir>/audit.jsonl`` holds one JSON object a line, appended under a file lock and fsynced:
every run the silo served (``run``), every payload that left (``payload``: round, bytes as
``ArrayRecord.count_bytes()``, SHA-256 of the arrays), every refusal with its full reason
(``refused``), runs held for approval (``pending``) and approvals (``approved``). It is for the
silo's operator (`silotune silo audit`); nothing in it is sent anywhere.

Approvals live in ``<state-dir>/approvals/``: ``<run_id>.approved`` (written by `silotune silo
approve RUN_ID`) and ``<run_id>.pending`` (when the run was first held; the timeout counts from it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from silotune.atomic_files import atomic_write_json
from silotune.errors import UserError

AUDIT_FILE = "audit.jsonl"
APPROVALS_DIR = "approvals"


def audit_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / AUDIT_FILE


def append_audit(state_dir: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one entry and fsync it before returning (a crash after this keeps the entry)."""
    entry = {"ts": time.time(), "kind": kind, **fields}
    path = audit_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return entry


def read_audit(state_dir: str | Path) -> Iterator[dict[str, Any]]:
    path = audit_path(state_dir)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def arrays_sha256(arrays: Any) -> str:
    """SHA-256 over an ArrayRecord's arrays in order: each key, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key in arrays:
        arr = arrays[key]
        h.update(
            key.encode() + b"\0" + str(arr.dtype).encode() + b"\0" + repr(tuple(arr.shape)).encode() + b"\0"
        )
        h.update(bytes(arr.data))
    return h.hexdigest()


def _run_file(state_dir: str | Path, run_id: int | str, suffix: str) -> Path:
    text = str(run_id).strip()
    if not text.isdigit():
        raise UserError(f"run id {run_id!r}: expected Flower's numeric run id (see `flwr ls`)")
    return Path(state_dir) / APPROVALS_DIR / f"{int(text)}.{suffix}"


def is_approved(state_dir: str | Path, run_id: int | str) -> bool:
    return _run_file(state_dir, run_id, "approved").exists()


def approve_run(state_dir: str | Path, run_id: int | str, note: str = "") -> Path:
    """Record this operator's approval of ``run_id`` (idempotent) and audit it."""
    path = _run_file(state_dir, run_id, "approved")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        atomic_write_json(path, {"run_id": str(run_id), "approved_at": time.time(), "note": note})
        append_audit(state_dir, "approved", run_id=str(int(str(run_id).strip())), note=note)
    return path


def pending_since(state_dir: str | Path, run_id: int | str, now: float) -> tuple[float, bool]:
    """When ``run_id`` was first held (recording ``now`` if never); and whether this call recorded it."""
    path = _run_file(state_dir, run_id, "pending")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            return float(path.read_text().strip() or now), False
        except (OSError, ValueError):
            return now, False
    with os.fdopen(fd, "w") as fh:
        fh.write(repr(now))
    return now, True
