"""The Fleet proxy's Envoy configuration: what is forwarded, what is refused, what is logged
(statically, and one real Envoy for the access log)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from certs.pki import create_ca, issue_server_cert
from silotune.errors import UserError
from superlink.ops.launch import (
    SuperLinkOptions,
    build_superlink_argv,
    operator_address,
    proxy_access_log_path,
    proxy_options,
    start_fleet_proxy,
)
from superlink.ops.proxy import (
    ACCESS_LOG_FORMAT,
    STDOUT,
    ProxyOptions,
    build_envoy_argv,
    build_envoy_config,
    find_envoy,
    read_access_log,
)
from tests.support.waiting import wait_until


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    create_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["superlink.example.org"], [])
    return {"ca": tmp_path / "ca" / "ca.crt", "cert": tmp_path / "srv" / "server.pem",
            "key": tmp_path / "srv" / "server.key"}  # fmt: skip


def _opts(pki: dict[str, Path], **kw: Any) -> SuperLinkOptions:
    return SuperLinkOptions(ca_cert=pki["ca"], server_cert=pki["cert"], server_key=pki["key"], **kw)


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _routes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]


def test_only_fleet_and_health_are_forwarded(pki: dict[str, Path]) -> None:
    cfg = build_envoy_config(proxy_options(_opts(pki, host="0.0.0.0", port=8000)))
    listener = cfg["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8000}
    forwarded = [r["match"] for r in _routes(cfg) if "route" in r]
    assert forwarded == [{"prefix": "/v1/fleet/"}, {"path": "/health"}]
    refused = {r["match"]["prefix"]: r["direct_response"]["status"] for r in _routes(cfg)
               if "direct_response" in r}  # fmt: skip
    assert refused == {"/v1/control/": 403, "/v1/runtime/": 403, "/": 404}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["normalize_path"] and hcm["merge_slashes"]
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    # Same certificate on the public side; the upstream is loopback, verified by CA and SAN.
    down = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert down["tls_certificates"][0]["certificate_chain"]["filename"] == str(pki["cert"].resolve())
    cluster = cfg["static_resources"]["clusters"][0]
    ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert ep["socket_address"] == {"address": "127.0.0.1", "port_value": 8001}
    up = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert up["trusted_ca"]["filename"] == str(pki["ca"].resolve())
    assert up["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "127.0.0.1"}


def test_operator_address_is_loopback(pki: dict[str, Path]) -> None:
    assert operator_address(_opts(pki, port=8000)) == "127.0.0.1:8001"
    assert operator_address(_opts(pki, port=8000, internal_port=9001)) == "127.0.0.1:9001"
    assert operator_address(_opts(pki, host="0.0.0.0", port=8000, proxy=False)) == "127.0.0.1:8000"
    with pytest.raises(UserError, match="must differ"):
        build_superlink_argv(_opts(pki, port=8000, internal_port=8000))


def test_certificate_without_loopback_san_is_refused(pki: dict[str, Path], tmp_path: Path) -> None:
    issue_server_cert(tmp_path / "ca", tmp_path / "nolo", ["superlink.example.org"], [],
                      include_loopback=False)  # fmt: skip
    opts = SuperLinkOptions(ca_cert=pki["ca"], server_cert=tmp_path / "nolo" / "server.pem",
                            server_key=tmp_path / "nolo" / "server.key")  # fmt: skip
    with pytest.raises(UserError, match="no SAN 127.0.0.1"):
        build_superlink_argv(opts)
    build_superlink_argv(SuperLinkOptions(**{**opts.__dict__, "proxy": False}))  # --no-proxy: fine


def test_insecure_proxy_is_plaintext_but_still_filters() -> None:
    cfg = build_envoy_config(proxy_options(SuperLinkOptions(insecure=True)))
    assert "transport_socket" not in cfg["static_resources"]["listeners"][0]["filter_chains"][0]
    assert "transport_socket" not in cfg["static_resources"]["clusters"][0]
    assert any(r.get("direct_response", {}).get("status") == 403 for r in _routes(cfg))


def test_envoy_accepts_the_config(pki: dict[str, Path], tmp_path: Path) -> None:
    """Envoy's own validator (no sockets) accepts what we generate."""
    from superlink.ops.proxy import write_envoy_config

    try:
        find_envoy()
    except UserError as exc:
        pytest.skip(str(exc))
    popts = ProxyOptions("0.0.0.0", 8000, 8001, pki["ca"], pki["cert"], pki["key"],
                         access_log=tmp_path / "logs" / "access.log")  # fmt: skip
    path = write_envoy_config(popts, tmp_path / "envoy.json")
    assert (tmp_path / "logs").is_dir()  # Envoy creates the log file, not its folder
    argv = [*build_envoy_argv(path, popts), "--mode", "validate"]
    assert argv[argv.index("--file-flush-interval-msec") + 1] == "1000"  # the access log: ~1 s late
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "OK" in res.stdout + res.stderr, res.stderr[-2000:]


def test_access_log_is_json_lines_without_secrets(tmp_path: Path) -> None:
    cfg = build_envoy_config(ProxyOptions("0.0.0.0", 8000, 8001, access_log=tmp_path / "a.log"))
    (log,) = _hcm(cfg)["access_log"]
    assert log["name"] == "envoy.access_loggers.file"
    assert log["typed_config"]["path"] == str((tmp_path / "a.log").resolve())
    fmt = log["typed_config"]["log_format"]["json_format"]
    assert fmt == ACCESS_LOG_FORMAT
    for key in ("client", "method", "path", "status", "bytes_received", "bytes_sent",
                "wire_bytes_received", "wire_bytes_sent", "duration_ms", "start_time"):  # fmt: skip
        assert key in fmt, key
    # No header values (Flower's node-auth headers carry the public key and signature), no
    # bodies, no query strings: only the method among the request's own fields.
    for key, op in fmt.items():
        assert "REQ(" not in op or op == "%REQ(:METHOD)%", key
        assert not any(bad in op for bad in ("RESP(", "TRAILER(", "BODY", "METADATA", "FILTER_STATE"))
    assert fmt["path"].startswith("%PATH(NQ)")
    off = build_envoy_config(ProxyOptions("0.0.0.0", 8000, 8001))
    assert "access_log" not in _hcm(off)
    stdout = build_envoy_config(ProxyOptions("0.0.0.0", 8000, 8001, access_log=STDOUT))
    assert _hcm(stdout)["access_log"][0]["typed_config"]["path"] == "/dev/stdout"


def test_access_log_is_on_by_default_beside_the_log(pki: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "logs" / "superlink.log"
    opts = _opts(pki, port=8000)
    assert proxy_access_log_path(opts, log) == tmp_path / "logs" / "superlink-proxy-access.log"
    assert proxy_options(opts, log).access_log == tmp_path / "logs" / "superlink-proxy-access.log"
    assert proxy_options(opts).access_log is None  # no log, no place: none
    named = _opts(pki, port=8000, access_log_path=tmp_path / "audit" / "fleet.log")
    assert proxy_access_log_path(named, log) == tmp_path / "audit" / "fleet.log"
    assert proxy_access_log_path(named, None) == tmp_path / "audit" / "fleet.log"
    assert proxy_access_log_path(_opts(pki, port=8000, access_log=False), log) is None
    assert proxy_access_log_path(_opts(pki, port=8000, proxy=False), log) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REPLY = b"r" * 3000


class _Upstream(BaseHTTPRequestHandler):
    """Stands in for the SuperLink behind the proxy: reads the body, answers 3000 bytes."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/protobuf")
        self.send_header("Content-Length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def tls_upstream(pki: dict[str, Path]) -> Iterator[int]:
    """A TLS HTTP/1.1 server on 127.0.0.1 with the federation's server certificate."""
    server = ThreadingHTTPServer(("127.0.0.1", _free_port()), _Upstream)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _post(port: int, ca: Path, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_access_log_records_requests_through_a_real_envoy(
    pki: dict[str, Path], tmp_path: Path, tls_upstream: int
) -> None:
    """A forwarded and a refused request through a real Envoy (TLS both hops) land in the access
    log with their body and wire bytes; header values and query strings do not."""
    try:
        find_envoy()
    except UserError as exc:
        pytest.skip(str(exc))
    port = _free_port()
    access = tmp_path / "logs" / "proxy-access.log"
    popts = ProxyOptions("127.0.0.1", port, tls_upstream, pki["ca"], pki["cert"], pki["key"],
                         access_log=access)  # fmt: skip
    proxy, config_dir = start_fleet_proxy(popts, tmp_path / "logs" / "proxy.log")
    try:

        def listening() -> bool:
            proxy.check()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, 60, "the proxy to listen", 0.2)
        secret = {"X-Flwr-Signature": "SECRET-SIGNATURE", "Content-Type": "application/protobuf"}
        body = b"p" * 10_000
        fleet_path = "/v1/fleet/push-object?token=SECRET-QUERY"
        assert _post(port, pki["ca"], fleet_path, body, secret) == (200, REPLY)
        status, _ = _post(port, pki["ca"], "/v1/control/list-nodes", b"x" * 10, secret)
        assert status == 403
        status, _ = _post(port, pki["ca"], "/v1/fleet/%2F..%2Fcontrol/list-nodes", b"", secret)
        assert status == 400  # encoded slashes: rejected before routing, and logged too
        entries = wait_until(
            lambda: len(read_access_log(access)) >= 3 and read_access_log(access),
            30,
            "three access log lines (Envoy flushes about every second)",
            0.2,
        )
    finally:
        proxy.stop(grace=5)
        import shutil

        shutil.rmtree(config_dir, ignore_errors=True)
    fleet, control, encoded = entries
    assert fleet["method"] == "POST" and fleet["path"] == "/v1/fleet/push-object"
    assert fleet["status"] == 200 and fleet["protocol"] == "HTTP/1.1"
    assert fleet["client"].startswith("127.0.0.1:") and fleet["tls_version"] == "TLSv1.3"
    assert fleet["bytes_received"] == len(body) and fleet["bytes_sent"] == len(REPLY)
    # Wire bytes: the whole HTTP/1.1 message (request/status line, headers, body), before TLS.
    assert fleet["wire_bytes_received"] > len(body) + fleet["header_bytes_received"] > len(body)
    assert fleet["wire_bytes_sent"] > len(REPLY) + fleet["header_bytes_sent"] > len(REPLY)
    assert isinstance(fleet["duration_ms"], int)
    assert control["path"] == "/v1/control/list-nodes" and control["status"] == 403
    assert control["wire_bytes_sent"] > 0
    text = access.read_text()
    assert "SECRET" not in text
    assert encoded["status"] == 400
    assert [json.loads(line)["status"] for line in text.splitlines()] == [200, 403, 400]


# -- bounds ---------------------------------------------------------------------------------------
def _filters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f["typed_config"] for f in _hcm(cfg)["http_filters"]}


def test_bounds_are_rendered_with_a_body_limit_derived_from_the_adapter(pki: dict[str, Path]) -> None:
    """Body limit (413), deadlines, per-client bucket, circuit breakers, connection and heap caps."""
    from superlink.ops.proxy import (
        FLOWER_CHUNK_BYTES,
        MIN_CLIENT_RATE,
        REQUEST_OVERHEAD_BYTES,
        ProxyLimits,
        max_request_bytes_for,
        request_timeout_for,
    )

    # Unknown adapter: Flower's largest object (5 MiB) plus the request's overhead.
    cfg = build_envoy_config(proxy_options(_opts(pki, port=8000)))
    hcm, filters = _hcm(cfg), _filters(cfg)
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.local_ratelimit", "envoy.filters.http.buffer", "envoy.filters.http.router",
    ]  # fmt: skip
    default_body = FLOWER_CHUNK_BYTES + REQUEST_OVERHEAD_BYTES
    assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == default_body == 6 * 2**20
    # The request deadline lets the largest allowed body through at the slowest allowed link.
    assert hcm["request_timeout"] == f"{-(-default_body // MIN_CLIENT_RATE) + 30}s" == "222s"
    assert hcm["request_headers_timeout"] == "10s" and hcm["stream_idle_timeout"] == "300s"
    assert hcm["common_http_protocol_options"]["idle_timeout"] == "300s"
    assert hcm["max_request_headers_kb"] == 32
    rl = filters["envoy.filters.http.local_ratelimit"]
    assert rl["rate_limits"] == [{"actions": [{"remote_address": {}}]}]
    (desc,) = rl["descriptors"]
    assert desc["entries"] == [{"key": "remote_address"}]  # one bucket per client address
    assert desc["token_bucket"] == {"max_tokens": 500, "tokens_per_fill": 50, "fill_interval": "1s"}
    assert rl["max_dynamic_descriptors"] == 10000
    (cb,) = cfg["static_resources"]["clusters"][0]["circuit_breakers"]["thresholds"]
    assert cb == {"priority": "DEFAULT", "max_connections": 256, "max_pending_requests": 256,
                  "max_requests": 256, "max_retries": 0}  # fmt: skip
    listener = cfg["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 2**20
    overload = cfg["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    conns = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert conns["max_active_downstream_connections"] == 4096
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 2**30
    assert {a["name"] for a in overload["actions"]} == {
        "envoy.overload_actions.stop_accepting_requests", "envoy.overload_actions.reset_high_memory_stream",
    }  # fmt: skip

    # A small adapter: the limit follows it (one object of it, plus the overhead), and so does the
    # deadline; a large one is moved in 5 MiB objects, so the limit stops there.
    small = proxy_options(_opts(pki, port=8000, adapter_bytes=300_000)).limits
    assert small.max_request_bytes == 300_000 + REQUEST_OVERHEAD_BYTES == max_request_bytes_for(300_000)
    assert small.request_timeout_s == request_timeout_for(small.max_request_bytes) < 222
    small_cfg = build_envoy_config(proxy_options(_opts(pki, port=8000, adapter_bytes=300_000)))
    assert _filters(small_cfg)["envoy.filters.http.buffer"]["max_request_bytes"] == 300_000 + 2**20
    assert proxy_options(_opts(pki, adapter_bytes=40 * 2**20)).limits.max_request_bytes == default_body
    # Given outright: the body limit (the deadline follows it), or every bound.
    given = proxy_options(_opts(pki, adapter_bytes=300_000, max_request_bytes=9 * 2**20)).limits
    assert given.max_request_bytes == 9 * 2**20 and given.request_timeout_s == request_timeout_for(9 * 2**20)
    custom = ProxyLimits(max_request_bytes=2**20, request_timeout_s=5, client_requests_per_s=7)
    assert proxy_options(_opts(pki, proxy_limits=custom)).limits == custom
    with pytest.raises(UserError, match="below 64 KiB"):
        ProxyLimits(max_request_bytes=1000)
    with pytest.raises(UserError, match="client_burst must be positive"):
        ProxyLimits.for_adapter(None, client_burst=0)


def test_sizes_parse_and_the_cli_passes_them(tmp_path: Path) -> None:
    from superlink.ops.cli import _size
    from superlink.ops.proxy import parse_size

    assert parse_size("6291456") == 6291456
    assert parse_size("6MiB") == parse_size("6M") == parse_size("6 mib") == 6 * 2**20
    assert parse_size("512K") == 512 * 1024 and parse_size("1.5GiB") == 3 * 2**29
    assert _size(None) is None and _size("8MiB") == 8 * 2**20
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots")
