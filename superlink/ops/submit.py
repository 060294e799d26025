"""Submit a run to a federation with ``flwr run`` and follow it round by round.

The ServerApp logs one ``SILOTUNE-ROUND {json}`` line per round and ``SILOTUNE-DONE adapter=...`` at
the end (superlink/app/rounds.py); ``flwr run --stream`` relays them from wherever the SuperLink runs, so
progress works across machines without any extra port.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune import protocol as p
from silotune.errors import UserError
from silotune.protocol import DONE_PREFIX, FAILED_MARK, PROGRESS_PREFIX
from superlink.ops.flwr_app import app_dir, format_run_config
from superlink.ops.run_journal import record_submission


@dataclass
class RunResult:
    rounds: list[dict[str, Any]]
    adapter_dir: str
    log: str
    returncode: int


def submit_run(
    flwr_home: Path,
    connection: str,
    run_config: dict[str, Any],
    timeout: float = 1800.0,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    check: Callable[[], None] | None = None,
    logs_hint: Path | None = None,
    journal: Path | None = None,
) -> RunResult:
    """``flwr run`` the app with ``run_config`` overrides, streaming its log until the run ends.

    ``check`` is called about once a second (LocalFederation passes its process-group check, so a
    dead SuperLink or silo ends the wait at once with its name and log file). With ``journal``
    (a directory) the submission is recorded first, so a restarted central site resumes it
    (superlink/ops/run_journal.py).
    """
    from silotune.config import parse_run_config
    from silotune.flwr_connection import flower_env

    parse_run_config(run_config, source="--set / run config")  # refuse bad keys before submitting
    if journal is not None:
        record_submission(journal, run_config, connection)
    argv = [
        "flwr",
        "run",
        str(app_dir()),
        connection,
        "--stream",
        "--run-config",
        format_run_config(run_config),
    ]
    proc = subprocess.Popen(
        argv,
        env=flower_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines_q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # a thread, so that waiting for a line never blocks the checks
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines_q.put(raw)
        lines_q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    rounds: list[dict[str, Any]] = []
    adapter, lines, failed = "", [], False
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                where = f"; logs: {logs_hint}" if logs_hint else ""
                raise UserError(f"the run did not finish within {timeout:.0f} s{where}")
            if check is not None:
                check()
            try:
                line = lines_q.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            lines.append(line)
            if on_line:
                on_line(line)
            if PROGRESS_PREFIX in line:
                info = json.loads(line.split(PROGRESS_PREFIX, 1)[1])
                rounds.append(info)
                if on_round:
                    on_round(info)
            elif DONE_PREFIX in line:
                adapter = line.split("adapter=", 1)[1].strip()
                break  # the run is over; Flower's log stream lingers for a while
            elif FAILED_MARK in line:
                failed = True
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    if failed:
        raise UserError("the run failed on the SuperLink:\n" + "".join(lines[-20:]))
    if not adapter and not rounds:
        raise UserError("`flwr run` ended without running any round:\n" + "".join(lines[-20:]))
    return RunResult(rounds, adapter, "".join(lines), proc.returncode or 0)


@contextmanager
def round_progress(num_rounds: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar (round, silos answered, loss) fed by ``submit_run``'s ``on_round``.

    Where stdout is not a terminal (logs, CI) rich draws nothing, so each round is also printed.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]rounds"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task(
            "submitted; waiting for round 1 (silos load the model, then train)", total=num_rounds
        )

        def on_round(info: dict[str, Any]) -> None:
            loss = info.get(p.F_TRAIN_LOSS)
            done, answered, sampled = info[p.F_ROUND], info[p.F_ANSWERED], info[p.F_SAMPLED]
            text = f"round {done}: {answered}/{sampled} silos answered, loss " + (
                f"{loss:.4f}" if loss is not None else "- (no valid update)"
            )
            if not sys.stdout.isatty():
                print(text, flush=True)
            bar.update(task, total=info.get(p.F_NUM_ROUNDS, num_rounds), completed=done, description=text)

        yield on_round
