"""What the Fleet proxy (Envoy in front of a loopback SuperLink) costs, measured on loopback.

Two set-ups with the same TLS certificate, node authentication on: the SuperLink alone on its port
("direct", i.e. `--no-proxy`), and the SuperLink on 127.0.0.1 behind the proxy ("proxy", the
default). For each: the handshake (SuperNode process start -> the operator sees it online, over
real node-auth Fleet calls) and the round trip of Fleet requests (a fresh TLS connection per POST
to /v1/fleet/..., answered by the SuperLink; keep-alive requests too). Prints figures, then one
JSON line. Run: python benchmarks/proxy_overhead.py --quick
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
from silo_node.launch import SiloOptions, start_silo  # noqa: E402
from silotune.flwr_connection import write_connection  # noqa: E402
from silotune.processes import ProcessGroup  # noqa: E402
from superlink.admission import admit_silo, list_silos  # noqa: E402
from superlink.launch import SuperLinkOptions, operator_address, start_superlink  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    args = ap.parse_args()
    n_requests, n_handshakes = (100, 2) if args.quick else (500, 5)
    with tempfile.TemporaryDirectory(prefix="proxy-overhead-") as d:
        tmp = Path(d)
        create_ca(tmp / "ca")
        issue_server_cert(tmp / "ca", tmp / "srv", ["localhost"], [])
        direct = measure(tmp, proxy=False, n_requests=n_requests, n_handshakes=n_handshakes)
        proxied = measure(tmp, proxy=True, n_requests=n_requests, n_handshakes=n_handshakes)
    ratios = {k: proxied[k] / direct[k] for k in direct}
    for key in direct:
        print(f"{key:<14} direct {direct[key]:9.3f}   proxy {proxied[key]:9.3f}   ratio {ratios[key]:.2f}")
    print(json.dumps({"direct": direct, "proxy": proxied, "ratio": ratios,
                      "requests": n_requests, "handshakes": n_handshakes}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
