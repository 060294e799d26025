"""The run journal (superlink/ops/run_journal.py): what is re-submitted when the central site restarts.
No processes: the re-submission is a recorded call; the run dirs hold hand-written events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from superlink.app.run_lock import held_by, stop_orphaned_holder
from superlink.ops.run_journal import (
    MAX_FRUITLESS_RESUMES,
    load,
    open_entries,
    record_submission,
    resume_open_runs,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILOTUNE_RUNS_ROOT", str(tmp_path / "runs"))


def _event(tmp_path: Path, run_dir: str, **event: Any) -> None:
    path = tmp_path / "runs" / run_dir / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"ts": time.time(), "role": "server", **event}) + "\n")


class Submitter:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, home: Path, connection: str, config: dict[str, Any]) -> str:
        self.calls.append({"home": home, "connection": connection, **config})
        return str(100 + len(self.calls))


def test_an_interrupted_run_is_resubmitted_with_resume_on(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    record_submission(journal, {"run-dir": "a", "num-rounds": 3, "resume": False}, "old-conn")
    _event(tmp_path, "a", kind="run_start", start_round=1)  # then the ServerApp was killed
    sub, said = Submitter(), []
    assert resume_open_runs(journal, tmp_path / "home", "silotune", said.append, sub) == ["101"]
    # Continue, even if the first submission started over; to the restarted site's connection.
    assert sub.calls == [{"home": tmp_path / "home", "connection": "silotune", "run-dir": "a",
                          "num-rounds": 3, "resume": True}]  # fmt: skip
    assert "resumed run-dir a" in said[0]
    (path,) = journal.glob("*.json")
    assert load(path).history[0]["run_id"] == "101"


@pytest.mark.parametrize("status", ["completed", "budget_exceeded", "stalled"])
def test_a_run_that_ended_for_good_is_closed_not_resubmitted(tmp_path: Path, status: str) -> None:
    journal = tmp_path / "journal"
    record_submission(journal, {"run-dir": "b"}, "c")
    _event(tmp_path, "b", kind="run_end", status=status, rounds_completed=2)
    sub = Submitter()
    assert resume_open_runs(journal, tmp_path, "c", lambda _m: None, sub) == []
    assert open_entries(journal) == [] and sub.calls == []
    assert load(next(journal.glob("*.json"))).closed == status


def test_an_old_run_end_does_not_close_a_new_submission(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    _event(tmp_path, "c", kind="run_end", status="completed", rounds_completed=1)
    time.sleep(0.01)
    record_submission(journal, {"run-dir": "c", "num-rounds": 5}, "c")  # continue it to round 5
    _event(tmp_path, "c", kind="run_end", status="failed", rounds_completed=3, reason="SuperLink gone")
    assert len(open_entries(journal)) == 1


def test_resubmissions_without_progress_give_up_and_say_why(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    record_submission(journal, {"run-dir": "d"}, "c")
    _event(tmp_path, "d", kind="run_start", start_round=1)
    sub, said = Submitter(), []
    for _ in range(MAX_FRUITLESS_RESUMES):
        _event(tmp_path, "d", kind="run_end", status="failed", rounds_completed=0, reason="boom")
        resume_open_runs(journal, tmp_path, "c", said.append, sub)
    assert len(sub.calls) == MAX_FRUITLESS_RESUMES
    resume_open_runs(journal, tmp_path, "c", said.append, sub)
    assert len(sub.calls) == MAX_FRUITLESS_RESUMES
    assert "not resumed again" in said[-1] and "boom" in said[-1]
    assert load(next(journal.glob("*.json"))).closed == "gave_up"


def test_progress_resets_the_count(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    record_submission(journal, {"run-dir": "e", "num-rounds": 9}, "c")
    _event(tmp_path, "e", kind="run_start", start_round=1)
    sub = Submitter()
    for done in range(1, MAX_FRUITLESS_RESUMES + 3):
        ckpt = tmp_path / "runs" / "e"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "LATEST").write_text(f"round-{done:04d}\n")  # killed: no run_end, a new checkpoint
        resume_open_runs(journal, tmp_path, "c", lambda _m: None, sub)
    assert len(sub.calls) == MAX_FRUITLESS_RESUMES + 2


def test_a_refused_resubmission_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    for name in ("f1", "f2"):
        record_submission(journal, {"run-dir": name}, "c")
        _event(tmp_path, name, kind="run_start", start_round=1)
    said: list[str] = []

    def submit(home: Path, conn: str, cfg: dict[str, Any]) -> str:
        if cfg["run-dir"] == "f1":
            raise RuntimeError("SuperLink said no")
        return "7"

    assert resume_open_runs(journal, tmp_path, "c", said.append, submit) == ["7"]
    assert any("could not re-submit" in m and "SuperLink said no" in m for m in said)


def _lock_holder(tmp_path: Path, run_dir: Path, name: str) -> subprocess.Popen[bytes]:
    """A real process named ``name`` that takes the run dir's lock the way a ServerApp does and
    sleeps (SIGTERM ends it), like a flwr-serverapp that outlived its killed SuperLink."""
    script = tmp_path / name
    script.write_text(
        f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from superlink.app.run_lock import RunLock\n"
        f"with RunLock({str(run_dir)!r}, 'old-run'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
    return proc


def test_a_serverapp_left_from_a_killed_superlink_is_stopped_before_the_resume(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    record_submission(journal, {"run-dir": "orphan", "num-rounds": 3}, "c")
    _event(tmp_path, "orphan", kind="run_start", start_round=1)
    orphan = _lock_holder(tmp_path, tmp_path / "runs" / "orphan", "flwr-serverapp")
    try:
        assert held_by(tmp_path / "runs" / "orphan")["run_id"] == "old-run"
        sub, said = Submitter(), []
        assert resume_open_runs(journal, tmp_path, "c", said.append, sub) == ["101"]
        assert orphan.wait(timeout=20) is not None  # stopped, so the resumed run can take the lock
        assert held_by(tmp_path / "runs" / "orphan") is None
        assert any("stopped the ServerApp left from before the restart" in m and str(orphan.pid) in m
                   for m in said)  # fmt: skip
    finally:
        orphan.kill()
        orphan.wait(timeout=10)


def test_a_lock_holder_that_is_not_a_serverapp_is_left_alone_and_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "other"
    holder = _lock_holder(tmp_path, run_dir, "something-else")
    try:
        said = stop_orphaned_holder(run_dir, grace=1.0)
        assert said is not None and "not a flwr-serverapp: not stopped" in said
        assert holder.poll() is None and held_by(run_dir) is not None
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert stop_orphaned_holder(run_dir) is None  # free once its holder is gone


def test_a_run_dir_that_is_gone_is_not_started_over(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    record_submission(journal, {"run-dir": "gone"}, "c")
    sub, said = Submitter(), []
    assert resume_open_runs(journal, tmp_path, "c", said.append, sub) == []
    assert sub.calls == [] and "holds no run" in said[0]
    assert load(next(journal.glob("*.json"))).closed == "nothing_to_resume"


def test_superlink_start_offers_no_resume() -> None:
    import argparse

    from superlink.ops.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["superlink", "start", "--no-resume"]).no_resume is True
    assert parser.parse_args(["superlink", "start"]).no_resume is False


def test_a_full_disk_fails_the_checkpoint_clearly_and_keeps_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import numpy as np

    import superlink.app.checkpoints as ck

    store = ck.CheckpointStore(tmp_path / "run")
    adapter = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 4), np.float32)}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    store.save(1, adapter, cfg, {}, {"run_config": {}})

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_adapter_dir", full)
    with pytest.raises(ck.CheckpointError, match="round 2 .* no space left .* round-0001 is intact"):
        store.save(2, adapter, cfg, {}, {"run_config": {}})

    def full_safetensors(*_a: object, **_k: object) -> None:  # what safetensors really raises
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_adapter_dir", full_safetensors)
    with pytest.raises(ck.CheckpointError, match="round 2 .* no space left .* round-0001 is intact"):
        store.save(2, adapter, cfg, {}, {"run_config": {}})
    latest = store.latest()
    assert latest is not None and latest.round == 1
    assert [p.name for p in store.dir.iterdir()] == ["round-0001"]  # no half-written leftovers
