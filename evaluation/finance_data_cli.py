"""`silotune data finance`: build FlowerTune-style finance training files offline, leak-checked.

It sits beside ``silotune data split`` / ``check`` (``silo_node/ops/data_cli.py``) but lives here: it
needs the evaluation's own test splits to prove that no evaluation item is trained on, and the
silo role never imports the evaluation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from silotune.errors import UserError

DATA_ENV = "SILOTUNE_EVAL_DATA"


def _data_subcommands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``silotune data`` parser's own subcommands (registered by silo_node/ops/data_cli.py)."""
    data = sub.choices.get("data")
    if data is None:
        raise RuntimeError("silo_node.ops.data_cli must register `silotune data` first")
    return next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: argparse._SubParsersAction) -> None:
    fin = _data_subcommands(sub).add_parser(
        "finance",
        help="build finance training JSONL (FPB, FiQA, TFNS train rows; no evaluation item included)",
        description="Build FinGPT-style finance sentiment training files from FPB (sentences_50agree "
        "outside the 1,212-item test split), FiQA (outside the 304-item test split) and TFNS train, "
        "then drop every row whose normalised text equals any finance evaluation item. Writes "
        "<source>.jsonl per source (a federation split by source), finance-train.jsonl (all, with a "
        "'source' column) and finance-train.report.json (counts, dropped rows, labels).",
    )
    fin.add_argument(
        "--data-dir",
        type=Path,
        help=f"folder with the ingredient files (fpb/, fiqa/, tfns/ as in docs/evaluation.md); default "
        f"${DATA_ENV}; without either, --from-hub",
    )
    fin.add_argument(
        "--from-hub", action="store_true", help="fetch the ingredients from the Hugging Face hub"
    )
    fin.add_argument("--out", type=Path, required=True, help="output folder")
    fin.set_defaults(func=_finance)


def _finance(args: argparse.Namespace) -> int:
    from evaluation.benchmarks import DataSource
    from evaluation.finance_data import build_finance_data, write_finance_data

    root = args.data_dir or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if root is None and not args.from_hub:
        raise UserError(f"no ingredient files: pass --data-dir DIR, set {DATA_ENV}=DIR, or --from-hub")
    if root is not None and not root.is_dir():
        raise UserError(f"--data-dir {root}: not a directory")
    data = build_finance_data(DataSource(root=root, hub=root is None))
    written = write_finance_data(data, args.out)
    print(f"checked against {data.evaluation_texts:,} distinct finance evaluation texts (FPB, FiQA, TFNS)")
    for r in data.reports:
        labels = ", ".join(f"{k} {v}" for k, v in r.labels.items())
        print(
            f"{r.source:5s} read {r.read:6,}  test split {r.test_split:5,}  dropped as evaluation text "
            f"{r.leaked:3,}  kept {r.kept:6,}  ({labels})"
        )
    print(f"total {sum(r.kept for r in data.reports):,} rows; no training row equals an evaluation item")
    for path in written:
        print(f"wrote {path}")
    return 0
