"""Writing kits with edit protection: every generated file's hash goes into the manifest;
regenerating overwrites only files still as generated and writes ``<file>.new`` beside a file the
operator changed (``force`` overwrites it, keeping the edited one as ``<file>.bak``). Every write is
atomic (silotune.atomic_files)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from deploy.kit.names import GENERATOR, MANIFEST, MANIFEST_FILES, MANIFEST_GENERATOR
from deploy.kit.sources import looks_like_private_key
from silotune.atomic_files import atomic_write_bytes, atomic_write_json
from silotune.errors import UserError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class KitReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # operator-edited; new version in <file>.new
    overwritten: list[str] = field(default_factory=list)  # edited, replaced with --force

    def summary(self) -> str:
        lines = [
            f"{len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.kept)} kept (edited), "
            f"{len(self.overwritten)} overwritten"
        ]
        for rel in self.kept:
            lines.append(f"  kept your edited {rel}; the regenerated version is {rel}.new")
        for rel in self.overwritten:
            lines.append(f"  overwrote edited {rel} (--force); your version is {rel}.bak")
        return "\n".join(lines)


def _read_manifest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))[MANIFEST_FILES]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path} is damaged; move it away to regenerate (edited files will "
            "then be treated as yours and kept)"
        ) from None


def write_kits(files: dict[str, bytes], out: Path, force: bool = False) -> KitReport:
    """Write ``files`` (relative path -> content) under ``out`` without clobbering edits."""
    for rel, data in files.items():  # refuse before writing anything
        if looks_like_private_key(data):
            raise UserError(f"{rel} would contain a private key; refusing to write any kit")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    recorded = _read_manifest(manifest_path)
    report = KitReport()
    new_manifest = dict(recorded)
    for rel, data in sorted(files.items()):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            atomic_write_bytes(target, data)
            report.created.append(rel)
        else:
            current = target.read_bytes()
            if current == data:
                report.unchanged.append(rel)
            elif recorded.get(rel) == _sha(current):
                atomic_write_bytes(target, data)
                report.updated.append(rel)
            elif force:
                atomic_write_bytes(target.with_name(target.name + ".bak"), current)
                atomic_write_bytes(target, data)
                report.overwritten.append(rel)
            else:
                atomic_write_bytes(target.with_name(target.name + ".new"), data)
                report.kept.append(rel)
                continue  # keep the old record: the file still differs from what we made
        new_manifest[rel] = _sha(data)
    manifest = {MANIFEST_GENERATOR: GENERATOR, MANIFEST_FILES: dict(sorted(new_manifest.items()))}
    atomic_write_json(manifest_path, manifest, sort_keys=False)
    return report
