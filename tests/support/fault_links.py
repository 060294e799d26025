"""Broken links on one silo, in the network-namespace lab (docs: /work/shared/docs/test-lab.md).

The SuperLink (with its Fleet proxy) runs in one namespace, each silo in its own; the operator's
commands run inside the SuperLink's namespace (the root namespace never connects to a lab address).
Faults on silo-a only:

  clean     no fault (the reference for round times)
  link-down its link is cut for 30 s at a random moment of round 1, then restored
  loss      20 % of the packets it sends are dropped (nftables in its namespace)
  tbf       its egress is limited to 4 Mbit/s (tc tbf)
  latency   every chunk each way waits 100 ms in a TCP relay inside its namespace
            (tests/support/delay_relay.py; the kernel here has no netem)

Used by benchmarks/faults.py (``--only links``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from certs.node_key import generate_node_key
from certs.pki import create_ca, issue_server_cert
from silo_node.ops.launch import SiloOptions, start_silo
from silotune.events import read_events
from silotune.flwr_connection import run_flwr, write_connection
from silotune.processes import ProcessGroup, start_process
from superlink.ops.admission import admit_silo, list_silos
from superlink.ops.flwr_app import format_run_config
from superlink.ops.launch import SuperLinkOptions, start_superlink
from tests.support.fault_federation import run_config
from tests.support.federation_runs import write_silo_data
from tests.support.netlab import NetLab
from tests.support.waiting import wait_until

PORT = 8000
REPO = Path(__file__).resolve().parents[2]
SILOS = ("silo-a", "silo-b")
FAULTS = ("clean", "link-down", "loss", "tbf", "latency")
NFT_LOSS = (
    "table inet fault { chain out { type filter hook output priority 0; policy accept; "
    "ip daddr 198.18.0.0/15 numgen random mod 100 < 20 drop; }; }\n"
)


def _netns(ns: str, *argv: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, text=True, check=True,
                   capture_output=True, timeout=30)  # fmt: skip


def link_run(work: Path, model: Path, fault: str, rng: random.Random, rounds: int = 2) -> dict[str, Any]:
    """One run with ``fault`` on silo-a; returns status, per-round seconds and answers."""
    assert fault in FAULTS, fault
    work.mkdir(parents=True, exist_ok=True)
    with NetLab() as lab, ProcessGroup() as group:
        link = lab.add_host("link")
        hosts = {name: lab.add_host(name) for name in SILOS}
        create_ca(work / "ca")
        issue_server_cert(work / "ca", work / "srv", ["superlink.lab"], [link.ip])
        ca = work / "ca" / "ca.crt"
        opts = SuperLinkOptions(
            ca_cert=ca, server_cert=work / "srv" / "server.pem", server_key=work / "srv" / "server.key",
            host="0.0.0.0", port=PORT, database=work / "link" / "state.db",
            events_dir=work / "link" / "events", flwr_home=work / "link" / "flwr-home",
        )  # fmt: skip
        group.add(start_superlink(opts, work / "logs" / "superlink.log", netns=link.netns,
                                  health_address=f"{link.ip}:{PORT}", wait_timeout=180))  # fmt: skip
        home = opts.flwr_home  # the operator's home on the SuperLink's host: the ServerApp reads its
        assert home is not None  # admission ledger there, so silos are named as admitted
        write_connection(home, "silotune", f"127.0.0.1:{PORT + 1}", ca)
        a = hosts["silo-a"]
        address = {name: f"{link.ip}:{PORT}" for name in SILOS}
        if fault == "latency":
            relay = [sys.executable, "-m", "tests.support.delay_relay", "--listen", "127.0.0.1:9000",
                     "--to", f"{link.ip}:{PORT}", "--delay", "0.1", "--max-seconds", "3600"]  # fmt: skip
            group.add(start_process("delay relay", ["env", f"PYTHONPATH={REPO}", *relay],
                                    work / "logs" / "relay.log", netns=a.netns, cwd=REPO))  # fmt: skip
            time.sleep(1.0)
            address["silo-a"] = "127.0.0.1:9000"  # 127.0.0.1 is in the server certificate's SANs
        if fault == "loss":
            _netns(a.netns, "nft", "-f", "-", stdin=NFT_LOSS)
        if fault == "tbf":
            _netns(a.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "4mbit",
                   "burst", "16kb", "latency", "200ms")  # fmt: skip
        for i, name in enumerate(SILOS):
            key = generate_node_key(work / name / "keys", name)
            admit_silo(key.public_path, name, home, netns=link.netns)
            data = work / f"{name}.jsonl"
            write_silo_data(data, seed=i, n=16)
            policy = work / name / "policy.toml"  # the tiny model is a local directory: allowed
            policy.write_text("allow-local-paths = true\n")
            sopts = SiloOptions(
                superlink=address[name], ca_cert=ca, node_key=key.private_path,
                node_config={"data-path": str(data), "name": name, "columns": "input=text,output=label",
                             "policy-file": str(policy)},
                events_dir=work / name / "events", flwr_home=work / name / "flwr-home", threads=1,
            )  # fmt: skip
            group.add(start_silo(sopts, work / "logs" / f"{name}.log", netns=hosts[name].netns))

        def online() -> bool:
            silos = list_silos(home, netns=link.netns)
            return sorted(s.name for s in silos if s.status == "online") == list(SILOS)

        wait_until(online, 300, "both silos online", interval=3)
        run_dir = work / "run"
        cfg = run_config(model, str(run_dir), rounds, len(SILOS), **{"strategy.round-timeout": 300.0})
        res = run_flwr(["run", str(REPO), "silotune", "--run-config", format_run_config(cfg),
                        "--format", "json"], home, timeout=180, netns=link.netns, cwd=REPO)  # fmt: skip
        assert '"success": true' in res.stdout, res.stdout[-1000:] + res.stderr[-1000:]
        events_path = run_dir / "events.jsonl"

        def event(pred: Any) -> dict[str, Any] | None:
            return next((e for e in read_events(events_path) if pred(e)), None)

        cut = {}
        if fault == "link-down":
            wait_until(lambda: event(lambda e: e["kind"] == "round_start" and e["round"] == 1), 900,
                  "round 1")  # fmt: skip
            time.sleep(rng.uniform(0.0, 8.0))
            cut["at"] = time.time()
            lab.link(a, up=False)
            time.sleep(30.0)
            lab.link(a, up=True)
        end = wait_until(lambda: event(lambda e: e["kind"] == "run_end"), 1800, f"the {fault} run to end",
                    interval=2)  # fmt: skip
        events = list(read_events(events_path))
        ends = [e for e in events if e["kind"] == "round_end"]
        survived = (
            end["status"] == "completed"
            and end["rounds_completed"] == rounds
            and all(e.get("adapter_updated") for e in ends)
        )
        return {
            "fault": fault,
            "status": end["status"],
            "rounds_completed": end["rounds_completed"],
            "round_seconds": [round(e["duration_seconds"], 1) for e in ends],
            "answered": [e["answered"] for e in ends],
            "silo_a_rounds": sorted(
                e["round"] for e in events if e["kind"] == "silo_result" and e["silo"] == "silo-a"
            ),
            "survived": survived,
        }


if __name__ == "__main__":  # python -m tests.support.fault_links WORKDIR [FAULT ...]
    from tests.support.tiny_model import make_tiny_llama

    out = Path(sys.argv[1])
    mdl = make_tiny_llama(out / "tiny-llama")
    for f in sys.argv[2:] or FAULTS:
        print(json.dumps(link_run(out / f, mdl, f, random.Random(0))), flush=True)
