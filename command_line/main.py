"""The `silotune` command. Each area registers its own subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> provides `register(subparsers)`. One line per area keeps this file conflict-free.
_COMMAND_MODULES = [
    "silo_node.ops.cli",  # silo start
    "silo_node.ops.data_cli",  # data split, data check
    "evaluation.finance_data_cli",  # data finance (needs the evaluation's test splits)
    "superlink.ops.cli",  # superlink start, admission (silos admit/list/remove)
    "certs.cli",  # certs ...
    "superlink.ops.run_cli",  # run
    "monitoring.cli",  # exporter, report
    "deploy.cli",  # kit
    "demo.cli",  # demo
    "evaluation.cli",  # eval, compare
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silotune",
        description="Cross-silo federated PEFT fine-tuning of LLMs on Flower.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            # Only tolerate the area module itself being absent, never a broken import inside it.
            if exc.name is None or not mod_name.startswith(exc.name):
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line, not a traceback
        from silotune.errors import UserError

        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
