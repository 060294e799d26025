"""`silotune data split` and `silotune data check`."""

from __future__ import annotations

import argparse
from pathlib import Path

from silotune.config import parse_silo_config


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare and check silo data")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    sp = dsub.add_parser("split", help="partition one dataset into N silo files (IID or Dirichlet)")
    sp.add_argument("path", type=Path, help="JSON, JSONL, CSV or Parquet file")
    sp.add_argument(
        "--silos", type=int, default=0, help="number of silo files to write (--method column: optional)"
    )
    sp.add_argument("--out", type=Path, required=True, help="output directory")
    sp.add_argument(
        "--method",
        choices=["iid", "dirichlet", "column"],
        default="iid",
        help="iid; dirichlet (label-skewed); column (one silo per value of --label-column, e.g. source)",
    )
    sp.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (non-IID)")
    sp.add_argument("--label-column", help="label column (needed for --method dirichlet and column)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--encoding", default="utf-8")
    sp.set_defaults(func=_split)

    ck = dsub.add_parser("check", help="validate a silo's data file as the silo will read it")
    ck.add_argument("path", type=Path)
    ck.add_argument("--domain", choices=["general", "finance", "medical", "code"], required=True)
    ck.add_argument("--columns", default="", help="e.g. input=text,output=label")
    ck.add_argument("--label-map", default="", help="e.g. 0=negative,1=positive,2=neutral")
    ck.add_argument("--encoding", default="utf-8")
    ck.set_defaults(func=_check)


def _split(args: argparse.Namespace) -> int:
    from silo_node.ops.split import split_file
    from silotune.errors import UserError

    if args.silos < 1 and args.method != "column":
        raise UserError("--silos N is required (at least 1) for --method iid and dirichlet")
    written = split_file(
        args.path, args.out, args.silos, args.method, args.seed, args.alpha, args.label_column, args.encoding
    )
    for path, n, counts in written:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(f"{path}  {n} rows" + (f"  ({detail})" if detail else ""))
    return 0


def _check(args: argparse.Namespace) -> int:
    from silo_node.app.data import load_silo_records

    silo = parse_silo_config(
        {
            "data-path": str(args.path),
            "columns": args.columns,
            "label-map": args.label_map,
            "data-encoding": args.encoding,
            "domain": args.domain,
        }
    )
    records = load_silo_records(silo, args.domain)
    print(f"{args.path}: {len(records)} records OK for the {args.domain} template")
    return 0
