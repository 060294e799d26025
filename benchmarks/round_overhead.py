"""What a round costs beyond training: the resident silo worker against Flower's per-message process.

A real TLS federation on loopback (demo.local_federation.LocalFederation: SuperLink behind the
Fleet-only proxy, 3 SuperNodes with node keys), SmolLM2-135M-Instruct (embedded) with LoRA on the
demo's authored sample, run twice side by side in one invocation: silos with the resident worker
(`--executor resident`), then silos that start a fresh `flwr-clientapp` per message
(`--executor per-message`). Each silo gets its share of the cores, as the demo gives it.

Per round, from the central site's events:
- overhead ratio: the round's wall time / the slowest silo's training time (`train_seconds`);
- setup seconds, per silo: push -> reply at the server (`reply_seconds`) minus training time. It
  is everything that is not training: message transfer, process start, imports and model load in
  the per-message path, the adapter swap and data lookup in the resident one.

    python benchmarks/round_overhead.py --quick   # 3 rounds x 2 steps per executor
    python benchmarks/round_overhead.py           # 5 rounds x 4 steps (the demo's steps)

Prints a table per executor, then a last line holding one JSON object with
`overhead_ratio_max_from_round2` and `setup_seconds_max_from_round2` for the resident worker, and
the same figures for the per-message path under `per_message`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(executor: str, work: Path, rounds: int, steps: int) -> dict:
    from demo.local_federation import LocalFederation, SiloSpec
    from demo.sample_data import write_demo_data
    from silotune.events import read_events

    paths, _ = write_demo_data(work / "data", n_silos=3, per_silo=60)
    silos = [SiloSpec(f"silo-{i}", p, {"domain": "finance"}) for i, p in enumerate(paths)]
    with LocalFederation(work / "ws", silos, executor=executor) as fed:
        fed.submit(
            {
                "num-rounds": rounds,
                "strategy.min-nodes": 3,
                "run-dir": "overhead",
                "train.local-steps": steps,
                "train.batch-size": 4,
                "train.seq-length": 128,
            },
            timeout=3600,
        )
        events = list(read_events(fed.runs_root / "overhead" / "events.jsonl"))
    per_round = []
    for end in (e for e in events if e["kind"] == "round_end"):
        rnd = end["round"]
        results = [e for e in events if e["kind"] == "silo_result" and e["round"] == rnd]
        slowest = max(r["train_seconds"] for r in results)
        setup = [
            r["reply_seconds"] - r["train_seconds"] for r in results if r.get("reply_seconds") is not None
        ]
        per_round.append(
            {
                "round": rnd,
                "wall_seconds": end["duration_seconds"],
                "slowest_train_seconds": slowest,
                "overhead_ratio": end["duration_seconds"] / slowest,
                "setup_seconds_max": max(setup) if setup else None,
            }
        )
    later = [r for r in per_round if r["round"] >= 2]
    return {
        "rounds": per_round,
        "overhead_ratio_max_from_round2": max(r["overhead_ratio"] for r in later),
        "setup_seconds_max_from_round2": max(r["setup_seconds_max"] for r in later),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, steps = (3, 2) if args.quick else (5, 4)
    out = {}
    with tempfile.TemporaryDirectory(prefix="silotune-overhead-") as tmp:
        for executor in ("resident", "per-message"):
            print(f"== {executor}", file=sys.stderr, flush=True)
            out[executor] = run_one(executor, Path(tmp) / executor, rounds, steps)
    for executor, res in out.items():
        print(f"\n{executor}: round  wall s  slowest train s  ratio  setup s (max silo)")
        for r in res["rounds"]:
            print(
                f"  {r['round']:>5}  {r['wall_seconds']:6.1f}  {r['slowest_train_seconds']:15.1f}  "
                f"{r['overhead_ratio']:5.2f}  {r['setup_seconds_max']:6.1f}"
            )
    resident = out["resident"]
    print(
        json.dumps(
            {
                "quick": args.quick,
                "overhead_ratio_max_from_round2": resident["overhead_ratio_max_from_round2"],
                "setup_seconds_max_from_round2": resident["setup_seconds_max_from_round2"],
                "per_message": {
                    k: out["per-message"][k]
                    for k in ("overhead_ratio_max_from_round2", "setup_seconds_max_from_round2")
                },
                "rounds": {k: v["rounds"] for k, v in out.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
