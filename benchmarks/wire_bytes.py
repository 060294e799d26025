"""Flower's wire bytes against the adapter payload: HTTP framing, object requests and TLS.

A real TLS federation on loopback (demo.local_federation.LocalFederation: SuperLink behind the
Fleet-only Envoy proxy, silos with node keys, the resident worker) trains a tiny random Llama
(tests/support/tiny_model.py) with LoRA on every linear layer, so that one adapter is a few MB and the
payload dominates. The silos reach the proxy through a byte-counting TCP relay in this process,
and the bytes of the silos' traffic are counted at three layers:

- payload: the adapter bytes SiloTune counts (``silo_result`` events' uplink_bytes +
  downlink_bytes, i.e. ``ArrayRecord.count_bytes()``);
- HTTP wire bytes: the proxy's access log (superlink/ops/proxy.py ``ACCESS_LOG_FORMAT``), each request
  and response as sent (request/status line, headers, body), before TLS;
- TLS bytes: what crossed the relay (records, handshakes, session tickets), both ways.

One federation, one run per transport.dtype (fp32, then int8), each in its own time window. Per
run: wire/payload for the requests that carry adapters (push-object up, pull-object down: Flower
moves every array as its own objects, one POST each) and for all Fleet traffic of the run
(polling, heartbeats, get-run, get-fab, message envelopes), a per-endpoint breakdown, and the same
for rounds 2..N alone (steady state: no app download, no initial adapter upload, which one silo
makes in fp32 and no silo_result counts, and no round-1 adapter whose LoRA B matrices are all zero:
identical arrays are one object to Flower, moved once).

    python benchmarks/wire_bytes.py --quick   # 2 silos x 3 rounds, 2.1 MB fp32 adapter (~3 min)
    python benchmarks/wire_bytes.py           # 3 silos x 5 rounds, 8.4 MB fp32 adapter in 56
                                              # tensors (not timed yet)

Prints the figures per dtype, then a last line holding one JSON object: fp32's whole-run
`wire_to_payload_ratio_adapter_requests`, `wire_to_payload_ratio_all_fleet`,
`tls_to_payload_ratio`, `payload_bytes`, `endpoints` (requests and bytes per Fleet path) and
`steady_state`; every figure per dtype under `per_dtype`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 1.02
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER_PATHS = ("/v1/fleet/push-object", "/v1/fleet/pull-object")  # silo -> central, central -> silo
# TLS 1.3 record: 5-byte header, then 1 byte of inner content type and a 16-byte AEAD tag.
TLS13_RECORD_OVERHEAD = 22
MODES = {
    # hidden, layers, LoRA rank, silos, rounds
    "quick": {"hidden": 256, "layers": 2, "rank": 64, "silos": 2, "rounds": 3},
    "full": {"hidden": 512, "layers": 4, "rank": 64, "silos": 3, "rounds": 5},
}


class _Records:
    """Counts TLS records in one direction of a byte stream (5-byte headers: type, version, len)."""

    def __init__(self) -> None:
        self.header = b""
        self.left = 0  # body bytes of the current record still to come
        self.count: dict[int, int] = defaultdict(int)  # records per content type

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.left:
                step = min(self.left, n - i)
                self.left -= step
                i += step
                continue
            need = 5 - len(self.header)
            self.header += data[i : i + need]
            i += min(need, n - i)
            if len(self.header) == 5:
                self.count[self.header[0]] += 1
                self.left = int.from_bytes(self.header[3:5], "big")
                self.header = b""


class CountingRelay:
    """A TCP relay on 127.0.0.1 in a thread of this process: silos -> relay -> Fleet proxy.

    Counts bytes each way and TLS records, with a timestamped running total (to cut a run into
    windows), and remembers the local ports of its connections to the proxy: they are the
    ``client`` addresses the proxy's access log shows for the silos."""

    def __init__(self, to_port: int, max_seconds: float) -> None:
        self.to_port, self.max_seconds = to_port, max_seconds
        self.up = self.down = self.connections = 0
        self.records_up, self.records_down = _Records(), _Records()
        # (time, up, down, connections, TLS application records, other records), one per chunk
        self.series: list[tuple[float, int, int, int, int, int]] = [(0.0, 0, 0, 0, 0, 0)]
        self.upstream_ports: set[int] = set()
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="counting-relay", daemon=True)

    def start(self) -> CountingRelay:
        self._thread.start()
        if not self._ready.wait(30) or not self.port:
            raise RuntimeError("the counting relay did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def at(self, t: float) -> tuple[float, int, int, int, int, int]:
        """The running totals as they were at time ``t``."""
        series = list(self.series)  # appended by the relay's thread
        i = bisect.bisect_right([row[0] for row in series], t) - 1
        return series[max(i, 0)]

    def between(self, t0: float, t1: float) -> dict[str, int]:
        a, b = self.at(t0), self.at(t1)
        return {"up": b[1] - a[1], "down": b[2] - a[2], "connections": b[3] - a[3],
                "app_records": b[4] - a[4], "other_records": b[5] - a[5]}  # fmt: skip

    def _mark(self) -> None:
        app = self.records_up.count.get(23, 0) + self.records_down.count.get(23, 0)
        total = sum(self.records_up.count.values()) + sum(self.records_down.count.values())
        self.series.append((time.time(), self.up, self.down, self.connections, app, total - app))

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        async with server:
            try:
                await asyncio.wait_for(self._stop.wait(), self.max_seconds)  # bounded
            except TimeoutError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.to_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self.upstream_ports.add(int(uw.get_extra_info("sockname")[1]))
        await asyncio.gather(self._pipe(reader, uw, True), self._pipe(ur, writer, False))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        records = self.records_up if up else self.records_down
        try:
            while data := await reader.read(65536):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                records.feed(data)
                self._mark()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def _ts(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["start_time"].replace("Z", "+00:00")).timestamp()


def _num(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


def breakdown(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per path: requests, body, header and wire bytes each way (up = silo -> central)."""
    rows: dict[str, dict[str, int]] = {}
    for e in entries:
        row = rows.setdefault(
            str(e.get("path")),
            {"count": 0, "body_up": 0, "body_down": 0, "wire_up": 0, "wire_down": 0,
             "header_up": 0, "header_down": 0},
        )  # fmt: skip
        row["count"] += 1
        row["body_up"] += _num(e.get("bytes_received"))
        row["body_down"] += _num(e.get("bytes_sent"))
        row["wire_up"] += _num(e.get("wire_bytes_received"))
        row["wire_down"] += _num(e.get("wire_bytes_sent"))
        row["header_up"] += _num(e.get("header_bytes_received"))
        row["header_down"] += _num(e.get("header_bytes_sent"))
    return dict(sorted(rows.items(), key=lambda kv: -(kv[1]["wire_up"] + kv[1]["wire_down"])))


def _wire(rows: dict[str, dict[str, int]]) -> int:
    return sum(r["wire_up"] + r["wire_down"] for r in rows.values())


def window(
    entries: list[dict[str, Any]],
    relay: CountingRelay,
    t0: float,
    t1: float,
    payload: int,
    messages: int,
    silos: int,
) -> dict[str, Any]:
    """Ratios and the per-endpoint breakdown of the silos' traffic that started in [t0, t1]."""
    inside = [e for e in entries if t0 <= _ts(e) <= t1]
    paths = breakdown(inside)
    fleet = {p: r for p, r in paths.items() if p.startswith("/v1/fleet/")}
    adapter = {p: r for p, r in fleet.items() if p in ADAPTER_PATHS}
    adapter_wire, fleet_wire, http_wire = _wire(adapter), _wire(fleet), _wire(paths)
    adapter_body = sum(r["body_up"] + r["body_down"] for r in adapter.values())
    adapter_headers = sum(r["header_up"] + r["header_down"] for r in adapter.values())
    tls = relay.between(t0, t1)
    tls_bytes = tls["up"] + tls["down"]
    framing = TLS13_RECORD_OVERHEAD * tls["app_records"] + 5 * tls["other_records"]
    n_adapter = sum(r["count"] for r in adapter.values())
    return {
        "seconds": round(t1 - t0, 1),
        "payload_bytes": payload,
        "wire_to_payload_ratio_adapter_requests": adapter_wire / payload,
        "wire_to_payload_ratio_all_fleet": fleet_wire / payload,
        "tls_to_payload_ratio": tls_bytes / payload,
        "adapter_requests": n_adapter,
        "adapter_request_wire_bytes": adapter_wire,
        "adapter_request_body_bytes": adapter_body,
        # HTTP/1.1 framing of the adapter requests: everything that is not a body byte.
        "adapter_request_http_framing_bytes": adapter_wire - adapter_body,
        "adapter_request_header_bytes": adapter_headers,
        "header_bytes_per_adapter_request": round(adapter_headers / n_adapter) if n_adapter else 0,
        "adapter_messages": messages,
        "requests_per_adapter_message": round(n_adapter / messages, 1) if messages else 0,
        # Where wire/payload above 1 comes from, as fractions of the payload:
        "overhead_http_framing": (adapter_wire - adapter_body) / payload,
        # Protobuf envelope and object ids; over a whole run also the initial adapter upload (+)
        # and objects Flower did not move twice (identical arrays are one object: -).
        "overhead_bodies": (adapter_body - payload) / payload,
        "fleet_wire_bytes": fleet_wire,
        "silo_http_wire_bytes": http_wire,  # Fleet plus any /health probe of the silos
        "tls_bytes": tls_bytes,
        "tls": {
            "connections": tls["connections"],
            "records": tls["app_records"] + tls["other_records"],
            "record_framing_bytes": framing,  # 22 per TLS 1.3 application record, 5 per other
            "handshake_and_other_bytes": tls_bytes - http_wire - framing,
        },
        "requests_per_second_per_silo": round(len(inside) / max(t1 - t0, 1e-9) / silos, 2),
        "endpoints": paths,
    }


def _audit_init_bytes(fed: Any, t0: float, t1: float) -> int:
    """The initial adapter one silo uploads (fp32, the WANT_INIT query reply), from the silos'
    audit logs: adapter bytes that no ``silo_result`` event counts."""
    total = 0
    for path in (fed.ws / "silos").rglob("audit.jsonl"):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e.get("kind") == "payload" and e.get("phase") == "init" and t0 <= e["ts"] <= t1:
                total += int(e["bytes"])
    return total


def _settle(path: Path, quiet: float = 2.5, limit: float = 30.0) -> None:
    """Wait until the access log has not grown for ``quiet`` seconds (Envoy flushes every second)."""
    deadline, size, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.5)


def measure_run(
    fed: Any, relay: CountingRelay, access_log: Path, model: Path, dtype: str, mode: dict[str, int]
) -> dict[str, Any]:
    from silotune.events import read_events
    from superlink.ops.proxy import read_access_log

    run_dir = f"wire-{dtype}"
    t0 = time.time()
    result = fed.submit(
        {
            "model.name": str(model), "num-rounds": mode["rounds"], "run-dir": run_dir,
            "strategy.min-nodes": mode["silos"], "strategy.round-timeout": 900.0,
            # Two steps: every LoRA tensor changes each round (with B = 0 at first, one step
            # leaves A as it was, and Flower does not move an object the other side holds).
            "train.local-steps": 2, "train.batch-size": 2, "train.seq-length": 64,
            "peft.rank": mode["rank"], "peft.alpha": 2.0 * mode["rank"],
            "peft.target-modules": TARGETS, "transport.dtype": dtype,
        },
        timeout=3600,
    )  # fmt: skip
    t1 = time.time()
    if len(result.rounds) != mode["rounds"]:
        raise SystemExit(f"{dtype}: {len(result.rounds)} of {mode['rounds']} rounds completed")
    events = list(read_events(fed.runs_root / run_dir / "events.jsonl"))
    results = [e for e in events if e["kind"] == "silo_result"]
    round2 = next(e["ts"] for e in events if e["kind"] == "round_start" and e["round"] == 2)
    payload = sum(int(e["uplink_bytes"]) + int(e["downlink_bytes"]) for e in results)
    later = sum(int(e["uplink_bytes"]) + int(e["downlink_bytes"]) for e in results if e["round"] >= 2)
    _settle(access_log)
    silo_ports = {f"127.0.0.1:{p}" for p in relay.upstream_ports}
    entries = [e for e in read_access_log(access_log) if e.get("client") in silo_ports]
    whole = window(entries, relay, t0, t1, payload, 2 * len(results), mode["silos"])
    init = _audit_init_bytes(fed, t0, t1)
    whole["initial_adapter_bytes"] = init
    whole["adapter_request_body_to_moved_adapter_ratio"] = whole["adapter_request_body_bytes"] / (
        payload + init
    )
    return {
        "dtype": dtype,
        "rounds": mode["rounds"],
        "silos": mode["silos"],
        "adapter_bytes": results[0]["downlink_bytes"],
        "uplink_payload_bytes": sum(int(e["uplink_bytes"]) for e in results),
        "downlink_payload_bytes": sum(int(e["downlink_bytes"]) for e in results),
        **whole,
        # Rounds 2..N: no app download, no initial adapter, no LoRA-B-is-zero round.
        "steady_state": window(
            entries, relay, round2, t1, later, 2 * sum(e["round"] >= 2 for e in results), mode["silos"]
        ),
    }


def _table(w: dict[str, Any]) -> None:
    pay = w["payload_bytes"]
    head = ("path", "requests", "body up", "body down", "wire up", "wire down", "headers", "wire/payload")
    print(f"{head[0]:<36}" + "".join(f"{h:>13}" for h in head[1:]))
    for path, r in w["endpoints"].items():
        cells = [r["count"], r["body_up"], r["body_down"], r["wire_up"], r["wire_down"]]
        cells.append(r["header_up"] + r["header_down"])
        ratio = (r["wire_up"] + r["wire_down"]) / pay
        print(f"{path:<36}" + "".join(f"{c:>13,}" for c in cells) + f"{ratio:>13.4f}")
    tls = w["tls"]
    body, framing = w["adapter_request_body_bytes"], w["adapter_request_http_framing_bytes"]
    n, per = w["adapter_requests"], w["header_bytes_per_adapter_request"]
    print(
        f"  adapter requests (push-object, pull-object): wire/payload "
        f"{w['wire_to_payload_ratio_adapter_requests']:.4f} (goal <= {GOAL}); bodies {body:,} B, "
        f"HTTP framing {framing:,} B ({n} requests, {per} B of headers each)"
    )
    print(
        f"    above 1: HTTP framing {w['overhead_http_framing']:+.2%} ({w['requests_per_adapter_message']} "
        f"requests per adapter message), bodies vs payload {w['overhead_bodies']:+.2%}"
    )
    rate = w["requests_per_second_per_silo"]
    print(
        f"  all Fleet traffic:                            wire/payload "
        f"{w['wire_to_payload_ratio_all_fleet']:.4f} ({rate} requests/s per silo)"
    )
    print(
        f"  TLS on the wire (relay, both ways):           tls/payload  "
        f"{w['tls_to_payload_ratio']:.4f} ({tls['connections']} new connections, {tls['records']:,} "
        f"records: {tls['record_framing_bytes']:,} B record framing, "
        f"{tls['handshake_and_other_bytes']:,} B handshakes and the rest)"
    )


def report(res: dict[str, Any]) -> None:
    up, down = res["uplink_payload_bytes"], res["downlink_payload_bytes"]
    print(f"\n== transport.dtype={res['dtype']}: {res['silos']} silos x {res['rounds']} rounds, "
          f"{res['seconds']:.0f} s; adapter {res['adapter_bytes']:,} B per message; payload (silo_result) "
          f"{res['payload_bytes']:,} B (up {up:,}, down {down:,}); initial adapter upload "
          f"{res['initial_adapter_bytes']:,} B (not in silo_result)")  # fmt: skip
    print("-- whole run")
    _table(res)
    print(f"  adapter request bodies / (payload + initial adapter): "
          f"{res['adapter_request_body_to_moved_adapter_ratio']:.4f}")  # fmt: skip
    steady = res["steady_state"]
    print(f"-- rounds 2..{res['rounds']} (payload {steady['payload_bytes']:,} B)")
    _table(steady)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 silos, 3 rounds, ~2 MB adapter")
    parser.add_argument("--dtypes", default="fp32,int8", help="transport.dtype values, in order")
    args = parser.parse_args()
    from demo.local_federation import LocalFederation, SiloSpec
    from demo.sample_data import write_demo_data
    from superlink.ops.launch import access_log_beside
    from tests.support.tiny_model import make_tiny_llama

    mode = MODES["quick" if args.quick else "full"]
    load_before = os.getloadavg()
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-wire-") as tmp:
        work = Path(tmp)
        model = make_tiny_llama(work / "tiny-llama", hidden=mode["hidden"], layers=mode["layers"])
        paths, _ = write_demo_data(work / "data", n_silos=mode["silos"], per_silo=20)
        silos = [SiloSpec(f"silo-{i}", p, {"domain": "finance"}) for i, p in enumerate(paths)]
        fed = LocalFederation(work / "ws", silos)
        relay = CountingRelay(fed.port, max_seconds=4 * 3600).start()
        fed.address = f"127.0.0.1:{relay.port}"  # the silos' --superlink: through the relay
        access_log = access_log_beside(fed.ws / "logs" / "superlink.log")  # the launcher's default
        try:
            with fed:
                for dtype in args.dtypes.split(","):
                    print(f"== run: transport.dtype={dtype}", file=sys.stderr, flush=True)
                    out[dtype] = measure_run(fed, relay, access_log, model, dtype, mode)
        finally:
            relay.stop()
    for res in out.values():
        report(res)
    first = next(iter(out.values()))
    keys = ("wire_to_payload_ratio_adapter_requests", "wire_to_payload_ratio_all_fleet",
            "tls_to_payload_ratio", "payload_bytes")  # fmt: skip
    summary = {
        "quick": args.quick,
        "goal": GOAL,
        **{k: first[k] for k in keys},
        "dtype": first["dtype"],
        "initial_adapter_bytes": first["initial_adapter_bytes"],
        "steady_state": {k: first["steady_state"][k] for k in keys},
        "endpoints": first["endpoints"],
        "per_dtype": out,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "mode": mode,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
