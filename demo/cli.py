"""`silotune demo`: a real TLS federation of 3 silos on this machine, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from silotune.atomic_files import atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    from demo.demo import DemoOptions

    d = DemoOptions
    demo = sub.add_parser("demo", help="a real TLS federation of 3 silos on this machine, end to end")
    demo.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="where the demo keeps its CA, keys, logs, state and adapter (default "
        "$XDG_STATE_HOME/silotune/demo, i.e. ~/.local/state/silotune/demo: outside the checkout). "
        "A second run there starts clean and keeps only the CA, the server certificate and the node keys",
    )
    demo.add_argument(
        "--data",
        type=Path,
        help="train on a local finance data file (JSON/JSONL/CSV/Parquet) instead of the bundled TFNS "
        "subset; its own rows are then held out",
    )
    demo.add_argument("--columns", default="", help="column mapping for --data, e.g. input=text,output=label")
    demo.add_argument("--label-map", default="", help="label mapping for --data, e.g. 0=negative,1=positive")
    demo.add_argument(
        "--hub",
        action="store_true",
        help=f"train on FlowerTune's finance set from the Hugging Face hub ({_hub_dataset()}) instead of "
        "the bundled TFNS subset (held out: the bundled TFNS items); unreachable hub: the bundled "
        "subset, said so (one TCP probe of at most 1.5 s decides; HF_HUB_OFFLINE=1 without one)",
    )
    demo.add_argument(
        "--offline", action="store_true", help="never try the Hugging Face hub (wins over --hub)"
    )
    demo.add_argument("--model", default=d.model)
    demo.add_argument("--rounds", type=int, default=d.rounds)
    demo.add_argument("--local-steps", type=int, default=d.local_steps)
    demo.add_argument("--batch-size", type=int, default=d.batch_size)
    demo.add_argument("--seq-length", type=int, default=d.seq_length, help="tokens per training example")
    demo.add_argument("--lr", type=float, default=d.lr_max, help="peak learning rate (cosine to a tenth)")
    demo.add_argument("--per-silo", type=int, default=d.per_silo, help="training rows per silo")
    demo.add_argument("--eval-limit", type=int, default=d.eval_limit, help="held-out items to evaluate")
    demo.add_argument(
        "--transport",
        choices=("fp32", "bf16", "int8", "int4"),
        default=d.transport,
        help="how adapters travel (transport.dtype); the summary shows the payload and its fp32 size",
    )
    demo.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    demo.set_defaults(func=_demo)


def _hub_dataset() -> str:
    from demo.demo import HUB_DATASET

    return HUB_DATASET


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from demo.demo import DemoOptions, default_workspace, format_summary, run_demo

    opts = DemoOptions(
        workspace=args.workspace or default_workspace(),
        data=args.data,
        columns=args.columns,
        label_map=args.label_map,
        hub=args.hub,
        model=args.model,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        seq_length=args.seq_length,
        lr_max=args.lr,
        per_silo=args.per_silo,
        eval_limit=args.eval_limit,
        offline=args.offline,
        transport=args.transport,
    )
    report = run_demo(opts)
    print(format_summary(report))
    if args.summary_json:
        atomic_write_json(args.summary_json, asdict(report), sort_keys=False)
    return 0
