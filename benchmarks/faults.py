"""Faults survived, with figures: real processes on loopback, killed, stopped or starved mid-round.

A TLS SuperLink with node authentication and silos training a tiny random Llama
(tests/support/tiny_model.py), started by tests/support/fault_federation.py (LocalFederation's
steps). Scenarios:

  silo-kill       SIGKILL one silo's SuperNode at a random moment of round 1 (of 3), restart it
                  with the same command line 3 s later: round 1 completes with the other silo, the
                  killed silo answers again in a later round.
  superlink-kill  SIGKILL flower-superlink at a random moment of round 2, restart the central site:
                  the run journal re-submits the run, which resumes from its last checkpoint.
  serverapp-kill  the same with the ServerApp process (flwr-serverapp) killed instead.
  stalled-silo    SIGSTOP every silo process mid-round 2: the watchdog fails the round within its
                  bound; SiloTuneRoundFailedByWatchdog's expression is true in a real Prometheus
                  scraping the central exporter; SIGCONT, the run completes.
  disk-full       the run dir is a 4 MiB tmpfs, filled after round 1's checkpoint: round 2's
                  checkpoint fails with a clear error, round 1's is intact, a resume after freeing
                  space completes the run.

  links           in the network-namespace lab (tests/support/fault_links.py; root): one silo's link cut
                  for 30 s mid-round, 20 % packet loss (nftables), 4 Mbit/s (tc tbf), 100 ms each
                  way (a delaying TCP relay); each run against a clean run's round times. Not in
                  the default set (``--only links``): it builds its own federations.

A run "survived" when it completed every round, every checkpoint it wrote loads with
PeftModel.from_pretrained, and the scenario's own condition held. "Rounds lost": completed rounds
that were lost or had to be run again (for stalled-silo: rounds the watchdog failed, by design).

    python benchmarks/faults.py --quick    # 1 repetition of each
    python benchmarks/faults.py            # silo-kill 20, superlink-kill 10, serverapp-kill 10,
                                           # stalled-silo 3, disk-full 3
    python benchmarks/faults.py --only silo-kill --runs 5

Prints one tally line per scenario, then a LAST line with one JSON object: per scenario ``runs``,
``survived``, ``rounds_lost``, ``corrupt_checkpoints`` (and the machine's load average).
Needs root for disk-full (mount) and prometheus on PATH for stalled-silo (else they are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {"silo-kill": 20, "superlink-kill": 10, "serverapp-kill": 10, "stalled-silo": 3, "disk-full": 3}
CHOICES = [*FULL, "links"]
SILOS = ["hospital-a", "hospital-b"]


def main(argv: list[str] | None = None) -> int:
    from tests.support.fault_federation import (
        FaultFederation,
        central_kill,
        disk_full,
        silo_kill,
        silo_specs,
        stalled_silos,
    )
    from tests.support.tiny_model import make_tiny_llama

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition of each scenario")
    ap.add_argument("--only", action="append", choices=CHOICES, help="run only these scenarios")
    ap.add_argument("--runs", type=int, help="repetitions of each chosen scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--executor",
        choices=["per-message", "resident"],
        default="resident",
        help="the silos' executor: SiloTune's resident worker (the default) or Flower's "
        "fresh process per message",
    )
    ap.add_argument("--workdir", type=Path, help="keep workspaces and logs here (default: a temp dir)")
    args = ap.parse_args(argv)

    chosen = args.only or list(FULL)
    links = "links" in chosen
    counts = {s: (args.runs or (1 if args.quick else FULL[s])) for s in chosen if s != "links"}
    skipped = {}
    if "disk-full" in counts and os.geteuid() != 0:
        skipped["disk-full"] = "needs root (mount)"
    if "stalled-silo" in counts and shutil.which("prometheus") is None:
        skipped["stalled-silo"] = "prometheus not on PATH"
    for s in skipped:
        counts.pop(s)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="silotune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_tiny_llama(work / "tiny-llama")
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    t0 = time.monotonic()
    with ExitStack() as stack:
        fed = None
        if counts:
            fed = stack.enter_context(
                FaultFederation(work / "workspace", silo_specs(work, SILOS), executor=args.executor)
            )
        prom = None
        if "stalled-silo" in counts:
            from tests.support.monitoring_stack import exporter, prometheus

            central = stack.enter_context(exporter(fed.events_dir, "server", work / "exporter.log"))
            prom = stack.enter_context(prometheus(work / "prom", central, []))
        for scenario, n in counts.items():
            tallies = []
            for rep in range(n):
                started = time.monotonic()
                if scenario == "silo-kill":
                    t = silo_kill(fed, model, rep, rng, rounds=3, kill_round=1)
                elif scenario in ("superlink-kill", "serverapp-kill"):
                    t = central_kill(fed, model, rep, rng, scenario.split("-")[0], rounds=2, kill_round=2)
                elif scenario == "stalled-silo":
                    t = stalled_silos(fed, model, rep, rng, prom)
                else:
                    t = disk_full(fed, model, rep, rng)
                tallies.append(t)
                print(f"  {scenario} #{rep + 1}: {'survived' if t.survived else 'FAILED'} "
                      f"({time.monotonic() - started:.0f} s) {t.detail}", flush=True)  # fmt: skip
            results[scenario] = {
                "runs": n,
                "survived": sum(t.survived for t in tallies),
                "rounds_lost": sum(t.rounds_lost for t in tallies),
                "corrupt_checkpoints": sum(t.corrupt_checkpoints for t in tallies),
            }
            r = results[scenario]
            print(f"{scenario}: {r['survived']}/{n} survived, {r['rounds_lost']} rounds lost, "
                  f"{r['corrupt_checkpoints']} corrupt checkpoints", flush=True)  # fmt: skip
    if links:
        results["links"] = _links(work, model, rng, args.runs or 1)
    for s, why in skipped.items():
        print(f"{s}: skipped ({why})")
    summary = {
        **results,
        "skipped": skipped,
        "seconds": round(time.monotonic() - t0),
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "executor": args.executor,
        "workdir": str(work),
    }
    print(json.dumps(summary))
    flat = [r for k, r in results.items() if k != "links"] + [
        r for r in results.get("links", {}).values() if isinstance(r, dict)]  # fmt: skip
    ok = all(r["survived"] == r["runs"] for r in flat)
    return 0 if ok else 1


def _links(work: Path, model: Path, rng: random.Random, runs: int) -> dict:
    from tests.support.fault_links import FAULTS, link_run
    from tests.support.netlab import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        print(f"links: skipped ({reason})")
        return {"skipped": reason}
    out: dict = {}
    for fault in FAULTS:
        rows = [link_run(work / "links" / f"{fault}-{i}", model, fault, rng) for i in range(runs)]
        for r in rows:
            print(f"  links {fault}: {r}", flush=True)
        out[fault] = {
            "runs": runs, "survived": sum(r["survived"] for r in rows),
            "rounds_lost": sum(max(0, 2 - r["rounds_completed"]) for r in rows),
            "corrupt_checkpoints": 0,
            "round_seconds": [r["round_seconds"] for r in rows],
        }  # fmt: skip
        f = out[fault]
        print(f"links {fault}: {f['survived']}/{runs} survived, round seconds {f['round_seconds']}",
              flush=True)  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
