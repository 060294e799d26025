"""Fewer bytes per round at the same accuracy? Adapter transport in fp32, bf16, int8 and int4.

Runs `silotune compare`'s in-process federation (FedAvg, the deployed round core, adapters moved
through silotune/wire_codec.py in the chosen format, silos keeping their error-feedback residual)
on TFNS split IID over 3 silos, SmolLM2-135M-Instruct (embedded), and scores each adapter on TFNS
the way `silotune eval` does. Every format trains from the same initial adapter with the same seeds,
so the only difference between rows is the transport.

    python benchmarks/transport.py --quick   # 2 rounds x 2 steps, 60 eval items (a few minutes)
    python benchmarks/transport.py           # the compare rows' budget: 5 rounds x 8 steps, batch 8,
                                             # 300 eval items (hours on 2 CPU cores)

Data: TFNS from $SILOTUNE_DATA_DIR, else ../shared/data beside the checkout (tfns/sent_train.csv to
train, the suite's TFNS file to evaluate). Prints a table, then a last line holding one JSON object:
per format `bytes_ratio` (wire bytes over fp32's, metadata included), `accuracy_delta_points`
(accuracy minus fp32's, in points), `macro_f1`, `accuracy`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row name, transport.dtype, error feedback)
FORMATS = (
    ("fp32", "fp32", True),
    ("bf16", "bf16", True),
    ("int8", "int8", True),
    ("int4", "int4", True),
    ("int8-no-ef", "int8", False),
    ("int4-no-ef", "int4", False),
)


def data_root() -> Path:
    return Path(os.environ.get("SILOTUNE_DATA_DIR", ROOT.parent / "shared" / "data"))


def run_format(dtype: str, feedback: bool, out: Path, quick: bool) -> dict:
    from command_line.main import main

    budget = (
        ["--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--eval-limit", "60"]
        if quick
        else ["--rounds", "5", "--local-steps", "8", "--batch-size", "8", "--eval-limit", "300"]
    )
    argv = [
        "compare", "--data", str(data_root() / "tfns" / "sent_train.csv"), "--silos", "3",
        "--split", "iid", "--label-column", "label", "--columns", "input=text,output=label",
        "--label-map", "0=negative,1=positive,2=neutral", "--base", "embedded:smollm2-135m-instruct",
        "--seq-length", "128", "--lr-max", "1e-3", "--rank", "8", "--approaches", "fedavg",
        "--eval-data-dir", str(data_root()), "--eval-benchmarks", "tfns",
        "--finance-max-new-tokens", "8", "--transport-dtype", dtype, "--out", str(out), *budget,
    ]  # fmt: skip
    if not feedback:
        argv.append("--no-error-feedback")
    if main(argv) != 0:
        raise SystemExit(f"compare failed for transport.dtype={dtype}")
    doc = json.loads((out / "compare.json").read_text())
    row = next(r for r in doc["rows"] if r["approach"] == "fedavg")
    return {
        "accuracy": row["scores"]["tfns"],
        "macro_f1": row["macro_f1"].get("tfns"),
        "wire_bytes": row["uplink_bytes"] + row["downlink_bytes"],
        "fp32_bytes": row["fp32_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes instead of hours")
    parser.add_argument("--formats", default=",".join(f[0] for f in FORMATS))
    args = parser.parse_args()
    wanted = [f for f in FORMATS if f[0] in args.formats.split(",")]
    if not (data_root() / "tfns" / "sent_train.csv").exists():
        raise SystemExit(f"TFNS not found under {data_root()} (set SILOTUNE_DATA_DIR)")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-transport-") as tmp:
        for name, dtype, feedback in wanted:
            print(f"== {name}", file=sys.stderr, flush=True)
            results[name] = run_format(dtype, feedback, Path(tmp) / name, args.quick)
    base = results.get("fp32")
    header = ("format", "wire bytes", "vs fp32", "accuracy", "Δ points", "macro-F1")
    print("\n{:<12} {:>14} {:>8} {:>9} {:>9} {:>9}".format(*header))
    for name, r in results.items():
        r["bytes_ratio"] = r["wire_bytes"] / base["wire_bytes"] if base else None
        r["accuracy_delta_points"] = 100 * (r["accuracy"] - base["accuracy"]) if base else None
        ratio = f"{r['bytes_ratio']:.4f}" if r["bytes_ratio"] is not None else "-"
        delta = f"{r['accuracy_delta_points']:+.2f}" if r["accuracy_delta_points"] is not None else "-"
        f1 = f"{100 * r['macro_f1']:.2f}" if r["macro_f1"] is not None else "-"
        print(f"{name:<12} {r['wire_bytes']:>14,} {ratio:>8} {100 * r['accuracy']:>8.2f}% {delta:>9} {f1:>9}")
    print(json.dumps({"quick": args.quick, "formats": results}))


if __name__ == "__main__":
    main()
