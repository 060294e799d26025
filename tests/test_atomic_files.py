"""Atomic whole-file writes: the old content survives any failure, and no temporary file is left."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from silotune import atomic_files
from silotune.atomic_files import atomic_write_json, atomic_write_text


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_writes_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "report.md"
    atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n"
    atomic_write_text(target, "second ✓\n")
    assert target.read_text(encoding="utf-8") == "second ✓\n"
    assert _siblings(target) == ["report.md"]
    # The temporary file starts 0600; the result must not stay that way.
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "compare.json"
    atomic_write_text(target, '{"rows": ["measured for an hour"]}\n')

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, '{"rows": ["measured for an hour", "and one more"]}\n')
    assert json.loads(target.read_text()) == {"rows": ["measured for an hour"]}
    assert _siblings(target) == ["compare.json"]


def test_an_interrupted_rename_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ledger.json"
    atomic_write_json(target, {"silo-a": 1})

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"silo-a": 1, "silo-b": 2})
    assert json.loads(target.read_text()) == {"silo-a": 1}
    assert _siblings(target) == ["ledger.json"]


def test_json_that_cannot_be_serialised_never_touches_the_target(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"round": 3})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="[Cc]ircular"):
        atomic_write_json(target, loop)
    assert json.loads(target.read_text()) == {"round": 3}
    assert _siblings(target) == ["state.json"]


def test_json_key_order(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"schema": 1, "a": 2})
    assert list(json.loads(target.read_text())) == ["a", "schema"]
    atomic_write_json(target, {"schema": 1, "a": 2}, sort_keys=False)
    assert list(json.loads(target.read_text())) == ["schema", "a"]
    assert target.read_text().endswith("}\n")


def test_replacing_keeps_the_files_permissions(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.write_text("old\n")
    os.chmod(target, 0o600)  # an operator tightened it
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write_text(tmp_path / "fresh.md", "x", mode=0o640)
    assert stat.S_IMODE((tmp_path / "fresh.md").stat().st_mode) == 0o640
