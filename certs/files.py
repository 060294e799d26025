"""Writing identity files safely: keys 0600, never overwritten silently, always backed up."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from silotune.atomic_files import atomic_write_bytes
from silotune.errors import UserError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def backup_path(path: Path) -> Path:
    """A free sibling name ``<file>.bak-YYYYmmdd-HHMMSS[-n]`` for a file being replaced."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    # Bounded: two rotations in the same second get -1, -2, ...; 1000 is far beyond any real use.
    while candidate.exists() and n < 1000:
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        n += 1
    return candidate


def check_writable(paths: Iterable[Path], force: bool) -> None:
    """Refuse before writing anything when an output exists and ``force`` is not set.

    Checking all outputs first means a refused command leaves no half-written set behind.
    """
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise UserError(
            f"{names} already exist(s); refusing to overwrite identity files. "
            "Pass --force to replace them (the old files are kept as *.bak-<time>)."
        )


def move_aside(path: Path) -> Path | None:
    """Rename an existing file to a backup name (mode preserved); return the backup path."""
    if not path.exists():
        return None
    dest = backup_path(path)
    os.replace(path, dest)
    return dest


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte (no window where others could read it).

    The caller has already moved any old file aside; O_EXCL makes a race an error, not an overwrite.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # umask cannot widen it, but be explicit about intent
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes) -> None:
    """A certificate or public key, replaced atomically (fsynced), readable by all."""
    atomic_write_bytes(path, data, mode=PUBLIC_MODE)


def replace_files(private: dict[Path, bytes], public: dict[Path, bytes], force: bool) -> list[Path]:
    """Write a set of files, refusing or backing up existing ones; return the backups made."""
    check_writable([*private, *public], force)
    backups = [b for p in [*private, *public] if (b := move_aside(p)) is not None]
    for path, data in private.items():
        write_private(path, data)
    for path, data in public.items():
        write_public(path, data)
    return backups
