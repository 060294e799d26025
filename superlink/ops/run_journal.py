"""The run journal: a run submitted through SiloTune is resumed by itself when the central site restarts.

``silotune run`` and ``LocalFederation.submit`` record each submission, before it is sent, as
``<workspace>/journal/<run-dir key>.json`` (written atomically): the run config, the connection it
went to, when. The ServerApp's ``run_end`` event in ``<run-dir>/events.jsonl`` closes the entry
when its status is one of CLOSING_STATUSES (the run is over by design); a run whose ServerApp was
killed writes no run_end (or ``failed``/``stopped`` when its SuperLink vanished under it), so its
entry stays open.

``silotune superlink start`` (and ``LocalFederation.start``) call ``resume_open_runs`` once the
SuperLink answers: every open entry is submitted again with ``resume=true``, so ``Federation``
continues from the run dir's last complete checkpoint (superlink/app/checkpoints.py); the run-dir lock
(superlink/app/run_lock.py) refuses a second ServerApp on the same run dir, so a run is never doubled. A
ServerApp that outlived its killed SuperLink still holds that lock; the restarted site stops it
first (run_lock.stop_orphaned_holder), since none of the new site's own ServerApps exists yet.

Why re-submit at all: Flower 1.41 does not restart a ServerApp after a crash. A ServerApp that was
killed (or whose SuperLink was killed) stops sending task heartbeats, and the SuperLink marks its
run ``finished:failed`` ("No heartbeat received from the task"); a restarted SuperLink never starts
it again. See docs/runbook-central.md.

A run that keeps failing without completing a new round is not re-submitted for ever: after
MAX_FRUITLESS_RESUMES automatic re-submissions without progress the entry is closed as
``gave_up`` and the operator is told why.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from silotune import protocol as p
from silotune.atomic_files import atomic_write_json
from superlink.app.run_lock import stop_orphaned_holder
from superlink.ops.flwr_app import app_dir, format_run_config

JOURNAL_DIR = "journal"
# run_end statuses that end a run for good (superlink/app/rounds.py); "failed" and "stopped" do not:
# a SuperLink killed under its ServerApp can make it end either way.
CLOSING_STATUSES = p.CLOSING_STATUSES
MAX_FRUITLESS_RESUMES = 3


@dataclass
class Submission:
    run_dir: str  # as submitted; relative run dirs resolve like the ServerApp's (server_app.py)
    run_config: dict[str, Any]
    connection: str
    submitted_at: float
    resumes: int = 0  # automatic re-submissions since the last round was completed
    rounds_completed: int = 0  # the true count at the last re-submission
    closed: str = ""  # "" while open, else the run_end status (or "gave_up")
    history: list[dict[str, Any]] = field(default_factory=list)


def journal_dir(workspace: Path) -> Path:
    return Path(workspace) / JOURNAL_DIR


def _key(run_dir: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_dir.strip("/"))[-60:] or "run"
    return f"{slug}-{hashlib.sha256(run_dir.encode()).hexdigest()[:10]}"


def _run_dir_of(run_config: dict[str, Any]) -> str:
    from silotune.config import parse_run_config

    return str(parse_run_config(dict(run_config), source="run journal").run_dir)


def resolve(entry: Submission) -> Path:
    """The run dir as the ServerApp sees it (relative: under $SILOTUNE_RUNS_ROOT, else the cwd)."""
    from superlink.app.server_app import resolve_run_dir

    return resolve_run_dir(entry.run_dir)


def record_submission(journal: Path, run_config: dict[str, Any], connection: str) -> Path:
    """Write (or replace: a hand re-submission starts the count again) the run dir's entry."""
    run_dir = _run_dir_of(run_config)
    entry = Submission(run_dir, dict(run_config), connection, time.time())
    path = Path(journal) / f"{_key(run_dir)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(entry))
    return path


def load(path: Path) -> Submission | None:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return Submission(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _save(path: Path, entry: Submission) -> None:
    atomic_write_json(path, asdict(entry))


def last_run_end(entry: Submission) -> dict[str, Any] | None:
    """The newest run_end written since the entry's submission, or None."""
    from silotune.events import read_events

    ends = [
        e
        for e in read_events(resolve(entry) / "events.jsonl")
        if e.get("kind") == p.EV_RUN_END and float(e.get("ts", 0)) >= entry.submitted_at
    ]
    return ends[-1] if ends else None


def refresh(path: Path) -> Submission | None:
    """Load the entry and close it if its run ended for good; return it (None if unreadable)."""
    entry = load(path)
    if entry is None or entry.closed:
        return entry
    end = last_run_end(entry)
    if end and end.get("status") in CLOSING_STATUSES:
        entry.closed = str(end["status"])
        _save(path, entry)
    return entry


def open_entries(journal: Path) -> list[tuple[Path, Submission]]:
    out = []
    for path in sorted(Path(journal).glob("*.json")):
        entry = refresh(path)
        if entry is not None and not entry.closed:
            out.append((path, entry))
    return out


def _submit_detached(flwr_home: Path, connection: str, run_config: dict[str, Any]) -> str:
    """``flwr run`` without streaming: returns the new run id once the SuperLink accepted it."""
    from silotune.errors import UserError
    from silotune.flwr_connection import run_flwr

    args = ["run", str(app_dir()), connection, "--run-config", format_run_config(run_config)]
    res = run_flwr([*args, "--format", "json"], flwr_home, timeout=120)
    start = res.stdout.find("{")
    try:
        reply = json.loads(res.stdout[start:]) if start >= 0 else {}
    except ValueError:
        reply = {}
    if not reply.get("success"):
        raise UserError(f"`flwr run` refused the re-submission: {(res.stdout + res.stderr)[-600:]}")
    return str(reply.get("run-id", "?"))


def resume_open_runs(
    journal: Path,
    flwr_home: Path,
    connection: str,
    say: Callable[[str], None] = print,
    submit: Callable[[Path, str, dict[str, Any]], str] | None = None,
) -> list[str]:
    """Re-submit every open journal entry (resume=true); return the new run ids.

    Called once the SuperLink answers. ``connection`` is the one the restarted site just wrote
    (its address may differ from the entry's). A failed re-submission is reported, not raised:
    the SuperLink keeps running for the other runs and for `silotune run`."""
    submit = submit or _submit_detached
    started = []
    for path, entry in open_entries(journal):
        if not (resolve(entry) / "events.jsonl").is_file():
            # Never started, deleted, or on a disk that is not mounted: nothing to continue from, and
            # re-submitting would start the whole run over in an empty directory.
            entry.closed = "nothing_to_resume"
            _save(path, entry)
            say(f"run-dir {entry.run_dir}: not resumed: {resolve(entry)} holds no run (no events.jsonl);"
                " submit it again if it should run")  # fmt: skip
            continue
        end = last_run_end(entry)
        done = max(int(end.get("rounds_completed", 0)) if end else 0, _checkpointed_rounds(entry))
        if done > entry.rounds_completed:
            entry.resumes, entry.rounds_completed = 0, done
        if entry.resumes >= MAX_FRUITLESS_RESUMES:
            entry.closed = "gave_up"
            _save(path, entry)
            say(
                f"run-dir {entry.run_dir}: not resumed again: {entry.resumes} automatic resumes made "
                f"no progress (last: {end.get('reason', end.get('status')) if end else 'no run_end'});"
                " fix the cause, then `silotune run` it again"
            )
            continue
        # A SuperLink killed under its ServerApp can leave that ServerApp alive and holding the run
        # dir: the re-submission would be refused by the run-dir lock and the run never resumed.
        stopped = stop_orphaned_holder(resolve(entry))
        if stopped:
            say(f"run-dir {entry.run_dir}: {stopped}")
        config = {**entry.run_config, "resume": True}  # continue, even if it first started over
        try:
            run_id = submit(flwr_home, connection, config)
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the site
            say(f"run-dir {entry.run_dir}: could not re-submit: {exc}")
            continue
        entry.resumes += 1
        entry.history.append({"resubmitted_at": time.time(), "run_id": run_id, "from_round": done})
        _save(path, entry)
        say(f"resumed run-dir {entry.run_dir} after round {done} as run {run_id} (interrupted run)")
        started.append(run_id)
    return started


def _checkpointed_rounds(entry: Submission) -> int:
    """The round of the run dir's LATEST checkpoint (no run_end: the ServerApp was killed)."""
    try:
        name = (resolve(entry) / "LATEST").read_text().strip()
        return int(name.rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError):
        return 0
