"""The Fleet proxy's Envoy configuration, without processes: what is forwarded, what is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from certs.pki import create_ca, issue_server_cert
from silotune.errors import UserError
from superlink.launch import SuperLinkOptions, build_superlink_argv, operator_address, proxy_options
from superlink.proxy import ProxyOptions, build_envoy_argv, build_envoy_config, find_envoy


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    create_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["superlink.example.org"], [])
    return {"ca": tmp_path / "ca" / "ca.crt", "cert": tmp_path / "srv" / "server.pem",
            "key": tmp_path / "srv" / "server.key"}  # fmt: skip


def _opts(pki: dict[str, Path], **kw: Any) -> SuperLinkOptions:
    return SuperLinkOptions(ca_cert=pki["ca"], server_cert=pki["cert"], server_key=pki["key"], **kw)


def _routes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


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
    from superlink.proxy import write_envoy_config

    try:
        find_envoy()
    except UserError as exc:
        pytest.skip(str(exc))
    popts = ProxyOptions("0.0.0.0", 8000, 8001, pki["ca"], pki["cert"], pki["key"])
    path = write_envoy_config(popts, tmp_path / "envoy.json")
    argv = [*build_envoy_argv(path, popts), "--mode", "validate"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "OK" in res.stdout + res.stderr, res.stderr[-2000:]
