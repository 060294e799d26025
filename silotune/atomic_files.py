"""Whole-file writes that a crash never leaves half done.

Every file SiloTune rewrites in place (checkpoint metadata, the admission ledger, Flower's
config.toml, compare.json after each row, evaluation reports, the model hash index, a silo's kept
optimizer state) goes through here: the content is written to a hidden temporary file beside the
target, fsynced, then renamed over it. A reader, or a run resumed after a crash or a Ctrl-C, sees
the old content or the new, never a truncated mix; a write that fails leaves the old file and no
temporary file behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_file"]


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; create parent folders as needed.

    The result keeps the replaced file's permissions (an operator's chmod 600 on Flower's
    config.toml survives); a new file gets ``mode``, default 0644, set explicitly because the
    temporary file starts as 0600, which would make every report unreadable to the rest of a team.
    """
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``atomic_write_text`` for bytes (e.g. a safetensors file serialised in memory)."""
    path = Path(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, *, sort_keys: bool = True, mode: int | None = None) -> None:
    """``atomic_write_text`` of ``obj`` as indented JSON. Serialises first, so an object that cannot
    be written as JSON raises before the target is touched."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n"
    atomic_write_text(path, text, mode)


def fsync_file(path: Path) -> None:
    """Flush a file that a library wrote (safetensors' save_file does not fsync) to the disk, so a
    power loss after the rename that publishes it cannot leave it empty or short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries: a create, rename or delete inside it is durable only after this."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
