"""What the Fleet proxy (Envoy in front of a loopback SuperLink) costs, measured on loopback.

Two set-ups with the same TLS certificate, node authentication on: the SuperLink alone on its port
("direct", i.e. `--no-proxy`), and the SuperLink on 127.0.0.1 behind the proxy ("proxy", the
default). For each: the handshake (SuperNode process start -> the operator sees it online, over
real node-auth Fleet calls) and the round trip of Fleet requests (a fresh TLS connection per POST
to /v1/fleet/..., answered by the SuperLink; keep-alive requests too). Then a whole federation
each way (demo.local_federation.LocalFederation, 2 silos on the resident worker, a tiny random
Llama, 1 local step per round, so that the transport's share of a round is as large as it gets):
the ServerApp's handshake (query out -> reply in, slowest silo) and the round time (rounds 2 on;
round 1 loads the model). Prints figures, then one JSON line.

    python benchmarks/proxy_overhead.py --quick   # 100 requests, 2 handshakes, 1 x 5 rounds each way
    python benchmarks/proxy_overhead.py           # 500 requests, 5 handshakes, 2 x 8 rounds each way
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certs.node_key import generate_node_key  # noqa: E402
from certs.pki import create_ca, issue_server_cert  # noqa: E402
from silo_node.ops.launch import SiloOptions, start_silo  # noqa: E402
from silotune.flwr_connection import write_connection  # noqa: E402
from silotune.processes import ProcessGroup  # noqa: E402
from superlink.ops.admission import admit_silo, list_silos  # noqa: E402
from superlink.ops.launch import SuperLinkOptions, operator_address, start_superlink  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(conn: http.client.HTTPSConnection) -> None:
    # An unauthenticated, malformed Fleet call: the SuperLink parses and refuses it (4xx), which
    # is a full round trip through TLS, the proxy's routing and the SuperLink's HTTP stack.
    conn.request("POST", "/v1/fleet/pull-messages", body=b"",
                 headers={"Content-Type": "application/protobuf"})  # fmt: skip
    resp = conn.getresponse()
    resp.read()
    assert 400 <= resp.status < 500, resp.status


def fleet_rtt(port: int, ctx: ssl.SSLContext, n: int) -> dict[str, float]:
    fresh, kept = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        _post(conn)
        conn.close()
        fresh.append(time.perf_counter() - t0)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    _post(conn)  # warm
    for _ in range(n):
        t0 = time.perf_counter()
        _post(conn)
        kept.append(time.perf_counter() - t0)
    conn.close()
    return {"fresh_ms": 1000 * statistics.median(fresh), "keepalive_ms": 1000 * statistics.median(kept)}


def measure(tmp: Path, proxy: bool, n_requests: int, n_handshakes: int) -> dict[str, float]:
    ca = tmp / "ca" / "ca.crt"
    port = free_port()
    opts = SuperLinkOptions(
        ca_cert=ca, server_cert=tmp / "srv" / "server.pem", server_key=tmp / "srv" / "server.key",
        host="127.0.0.1", port=port, internal_port=free_port(), proxy=proxy,
        database=None, events_dir=tmp / f"ev-{proxy}", flwr_home=tmp / f"home-{proxy}",
    )  # fmt: skip
    home = tmp / f"op-{proxy}"
    write_connection(home, "silotune", operator_address(opts), ca)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    data = tmp / "data.jsonl"
    data.write_text("{}\n")
    with ProcessGroup() as group:
        group.add(start_superlink(opts, tmp / "logs" / f"superlink-{proxy}.log"))
        rtt = fleet_rtt(port, ctx, n_requests)
        handshakes = []
        for i in range(n_handshakes):
            name = f"silo-{int(proxy)}-{i}"
            nk = generate_node_key(tmp / name, name)
            admit_silo(nk.public_path, name, home)
            sopts = SiloOptions(
                superlink=f"127.0.0.1:{port}", ca_cert=ca, node_key=nk.private_path,
                runtime_port=free_port(), node_config={"data-path": str(data), "name": name},
                flwr_home=tmp / name / "flwr-home",
            )  # fmt: skip
            t0 = time.perf_counter()
            node = group.add(start_silo(sopts, tmp / "logs" / f"{name}.log", check=False,
                                        preflight=False))  # fmt: skip
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(s.name == name and s.status == "online" for s in list_silos(home)):
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"{name} did not come online")
            handshakes.append(time.perf_counter() - t0)
            node.stop()
    return {**rtt, "handshake_s": statistics.median(handshakes)}


def federation(tmp: Path, model: Path, proxy: bool, rounds: int, tag: str) -> dict[str, float]:
    """A real 2-silo federation with (or without) the proxy: handshake and round seconds."""
    from demo.local_federation import LocalFederation, SiloSpec
    from silotune.events import read_events
    from tests.support.federation_runs import write_silo_data

    ws = tmp / f"fed-{tag}"
    silos = []
    for i in range(2):
        data = ws / f"silo-{i}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_silo_data(data, seed=i, n=16)
        silos.append(SiloSpec(f"silo-{i}", data, {"columns": "input=text,output=label"}))
    with LocalFederation(ws / "workspace", silos, proxy=proxy) as fed:
        cfg = {"model.name": str(model), "num-rounds": rounds, "strategy.min-nodes": 2, "run-dir": "r",
               "train.local-steps": 1, "train.batch-size": 2, "train.seq-length": 48}  # fmt: skip
        fed.submit(cfg, timeout=900)
        events = list(read_events(fed.runs_root / "r" / "events.jsonl"))
    handshake = max(e["reply_seconds"] for e in events if e["kind"] == "silo_reply" and e["phase"] == "query")
    later = [e["duration_seconds"] for e in events if e["kind"] == "round_end" and e["round"] >= 2]
    return {"handshake_reply_s": handshake, "round_s": statistics.median(later)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes)")
    args = ap.parse_args()
    n_requests, n_handshakes = (100, 2) if args.quick else (500, 5)
    fed_reps, fed_rounds = (1, 5) if args.quick else (2, 8)
    with tempfile.TemporaryDirectory(prefix="proxy-overhead-") as d:
        tmp = Path(d)
        create_ca(tmp / "ca")
        issue_server_cert(tmp / "ca", tmp / "srv", ["localhost"], [])
        direct = measure(tmp, proxy=False, n_requests=n_requests, n_handshakes=n_handshakes)
        proxied = measure(tmp, proxy=True, n_requests=n_requests, n_handshakes=n_handshakes)
        from tests.support.tiny_model import make_tiny_llama

        model = make_tiny_llama(tmp / "tiny-llama")
        fed_runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for rep in range(fed_reps):  # alternated, so that a change in the machine's load hits both
            for proxy in (False, True):
                fed_runs[proxy].append(federation(tmp, model, proxy, fed_rounds, f"{int(proxy)}-{rep}"))
        for side, runs in ((direct, fed_runs[False]), (proxied, fed_runs[True])):
            for key in runs[0]:
                side[key] = statistics.median(r[key] for r in runs)
    ratios = {k: proxied[k] / direct[k] for k in direct}
    for key in direct:
        print(f"{key:<14} direct {direct[key]:9.3f}   proxy {proxied[key]:9.3f}   ratio {ratios[key]:.2f}")
    print(json.dumps({"direct": direct, "proxy": proxied, "ratio": ratios,
                      "requests": n_requests, "handshakes": n_handshakes,
                      "federation_runs_each_way": fed_reps, "federation_rounds": fed_rounds}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
