"""`silotune run`: submit a run to a federation from the central host and follow it round by round."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="submit a run to a federation and follow it round by round")
    run.add_argument("--superlink", help="HOST:PORT of the SuperLink (saved as a connection)")
    run.add_argument("--ca", type=Path, help="federation CA certificate (verifies the SuperLink)")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext connection (development only; the SuperLink must be --insecure)",
    )
    run.add_argument("--connection", default="silotune", help="connection name in FLWR_HOME")
    run.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="where the flwr connection lives (default ./.silotune or $SILOTUNE_WORKSPACE)",
    )
    run.add_argument(
        "--recipe",
        help="start from a shipped recipe of run-config keys, e.g. finance (silotune/recipes/); "
        "--config and --set override its keys",
    )
    run.add_argument(
        "--config", type=Path, help="run config TOML (keys as in pyproject's [tool.flwr.app.config])"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key, e.g. --set peft.rank=16 (repeatable)",
    )
    run.add_argument("--timeout", type=float, default=24 * 3600.0)
    run.set_defaults(func=_run)


def _parse_value(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def run_values(recipe: str | None, config: Path | None, sets: list[str]) -> dict[str, Any]:
    """The run config a submission sends: the recipe's keys, then the --config file's, then --set.

    Without a recipe, --config is taken whole (every default spelled out, as before); with one,
    only the keys the file itself sets override the recipe's.
    """
    from silotune.config import (
        flatten_run_config,
        load_toml_run_config,
        read_toml_run_values,
    )
    from silotune.errors import UserError
    from silotune.recipes import recipe_values

    values: dict[str, Any] = {}
    if recipe:
        values.update(recipe_values(recipe))
    if config:
        values.update(
            read_toml_run_values(config) if recipe else flatten_run_config(load_toml_run_config(config))
        )
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        values[key.strip()] = _parse_value(raw.strip())
    return values


def _run(args: argparse.Namespace) -> int:
    import os

    from silotune.errors import UserError
    from silotune.flwr_connection import write_connection
    from superlink.ops.run_journal import journal_dir
    from superlink.ops.submit import round_progress, submit_run

    ws = Path(args.workspace or os.environ.get("SILOTUNE_WORKSPACE", ".silotune"))
    flwr_home = ws / "flwr-home"
    if args.superlink:
        if not args.insecure and args.ca is None:
            raise UserError("--superlink needs --ca CA.crt (or --insecure, for development only)")
        write_connection(flwr_home, args.connection, args.superlink, args.ca, insecure=args.insecure)
    values = run_values(args.recipe, args.config, args.set)
    with round_progress(int(values.get("num-rounds", 3))) as on_round:
        # The journal sits in the workspace `silotune superlink start` uses: it resumes the run
        # after a crash of the central site (superlink/ops/run_journal.py).
        result = submit_run(flwr_home, args.connection, values, args.timeout, on_round=on_round,
                            journal=journal_dir(ws))  # fmt: skip
    print(f"global adapter saved at {result.adapter_dir} (on the SuperLink's host)")
    return 0
