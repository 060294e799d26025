"""The ServerApp: Flower's entry point at the central site. The work is in superlink/app/rounds.py."""

from __future__ import annotations

import os
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from silotune.config import parse_run_config
from silotune.protocol import DONE_PREFIX, FAILED_MARK
from superlink.app.rounds import Federation

app = ServerApp()

RUNS_ROOT_ENV = "SILOTUNE_RUNS_ROOT"


def resolve_run_dir(run_dir: str) -> Path:
    """Relative run dirs live under $SILOTUNE_RUNS_ROOT (set by the launcher), else the cwd."""
    p = Path(run_dir).expanduser()
    if not p.is_absolute():
        p = Path(os.environ.get(RUNS_ROOT_ENV, ".")) / p
    return p.resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(dict(context.run_config))
    run_dir = resolve_run_dir(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log(
        INFO,
        "SiloTune run: %d rounds, %s + %s, run dir %s",
        cfg.num_rounds,
        cfg.peft.method,
        cfg.strategy.name,
        run_dir,
    )
    federation = Federation(grid, cfg, run_dir, run_id=str(context.run_id))
    try:
        # Federation.run holds the run-dir lock and writes run_end (with the true round count and
        # the reason) however the run ends; a run refused by the lock writes no event at all.
        final = federation.run()
    except Exception as exc:
        log(ERROR, FAILED_MARK + ": %s", exc)
        raise
    log(INFO, DONE_PREFIX + "adapter=%s", final or "")
