"""Atomic per-round checkpoints of the global adapter, and resume.

Layout under the run directory::

    checkpoints/round-0003/adapter_model.safetensors   PeftModel.from_pretrained loads this dir
    checkpoints/round-0003/adapter_config.json
    checkpoints/round-0003/strategy_state.safetensors  server optimizer state (momentum, ...)
    checkpoints/round-0003/manifest.json               run config, round, metrics, base model
    LATEST                                             name of the newest complete checkpoint
    adapter -> checkpoints/round-0003                  convenience link to the newest adapter

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place (rename is atomic on POSIX), and only then is LATEST replaced (also by rename). A crash at any
point leaves the previous checkpoint and LATEST untouched; leftovers are removed on the next save.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from silotune.adapters import load_adapter_dir, save_adapter_dir
from silotune.atomic_files import atomic_write_json, atomic_write_text, fsync_dir, fsync_file

MANIFEST = "manifest.json"
STRATEGY_STATE = "strategy_state.safetensors"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    round: int
    path: Path
    adapter: OrderedDict[str, np.ndarray]
    peft_config: dict[str, Any]
    strategy_state: dict[str, np.ndarray]
    manifest: dict[str, Any]


class CheckpointError(RuntimeError):
    pass


class CheckpointStore:
    def __init__(self, run_dir: Path, keep: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep  # 0 keeps every round

    def round_dir(self, server_round: int) -> Path:
        return self.dir / f"round-{server_round:04d}"

    def save(
        self,
        server_round: int,
        adapter: dict[str, np.ndarray],
        peft_config: dict[str, Any],
        strategy_state: dict[str, np.ndarray],
        manifest: dict[str, Any],
    ) -> Path:
        from safetensors.numpy import save_file

        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.run_dir)  # the new checkpoints/ entry itself must survive a power loss
        self._remove_leftovers()
        final = self.round_dir(server_round)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".tmp-round-{server_round:04d}-"))
        try:
            save_adapter_dir(tmp, adapter, peft_config)
            state = {k: np.ascontiguousarray(v) for k, v in strategy_state.items()}
            save_file(state, str(tmp / STRATEGY_STATE))
            fsync_file(tmp / STRATEGY_STATE)  # save_file does not fsync: the optimizer state would be lost
            atomic_write_json(
                tmp / MANIFEST, {**manifest, "round": server_round, "format_version": FORMAT_VERSION}
            )
            fsync_dir(tmp)
            if final.exists():  # re-running a round after resume: replace the old one
                old = self.dir / f".old-{final.name}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._raise_if_disk_full(exc, server_round)
            raise
        try:
            self._write_latest(final.name)
        except OSError as exc:
            self._raise_if_disk_full(exc, server_round)
            raise
        self._prune()
        return final

    def _raise_if_disk_full(self, exc: BaseException, server_round: int) -> None:
        """A full disk is the operator's to fix: say so, and what is still safe to resume from."""
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        # safetensors reports it as its own SafetensorError: "... No space left on device (os error 28)"
        full = full or (isinstance(exc, Exception) and "No space left on device" in str(exc))
        if full:
            latest_file = self.run_dir / "LATEST"
            latest = latest_file.read_text().strip() if latest_file.exists() else ""
            kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint"
            cause = getattr(exc, "strerror", None) or exc
            raise CheckpointError(
                f"cannot write the checkpoint of round {server_round} to {self.dir}: no space left on "
                f"the device ({cause}); {kept}. Free space there, then submit the run again "
                "(or restart the central site): it resumes from the last checkpoint."
            ) from exc

    def _write_latest(self, name: str) -> None:
        atomic_write_text(self.run_dir / "LATEST", name + "\n")
        link_tmp = self.run_dir / ".adapter.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(Path("checkpoints") / name, link_tmp)
        os.replace(link_tmp, self.run_dir / "adapter")
        fsync_dir(self.run_dir)  # LATEST's and the link's new entries

    def _remove_leftovers(self) -> None:
        for p in self.dir.glob(".tmp-round-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        rounds = sorted(self.dir.glob("round-*"))
        for p in rounds[: -self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        if rounds[: -self.keep]:
            fsync_dir(self.dir)

    def load(self, path: Path) -> Checkpoint:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            adapter, peft_config = load_adapter_dir(path)
            from safetensors.numpy import load_file

            strategy_state = load_file(str(path / STRATEGY_STATE))
        except Exception as exc:  # OSError, JSON, safetensors' own errors: all mean "damaged"
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {exc}") from None
        return Checkpoint(int(manifest["round"]), path, adapter, peft_config, strategy_state, manifest)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint (LATEST first; if it is damaged, the newest that loads)."""
        candidates: list[Path] = []
        latest_file = self.run_dir / "LATEST"
        if latest_file.exists():
            candidates.append(self.dir / latest_file.read_text().strip())
        candidates += sorted(self.dir.glob("round-*"), reverse=True)
        for path in candidates:
            if path.is_dir():
                try:
                    return self.load(path)
                except CheckpointError:
                    continue
        return None
