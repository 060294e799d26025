"""The trust boundary across hosts: only the Fleet API is public; Control and Runtime are not.

Lab (network namespaces, docs/test-lab.md): the central host runs the SuperLink on 127.0.0.1:8001
behind the Envoy Fleet proxy on 0.0.0.0:8000; an admitted silo's host runs a SuperNode (node auth
through the proxy); an outsider's host holds only the public CA certificate. From the outsider's
and the silo's hosts, every Control action with the real `flwr` CLI pointed at the public address
is refused, and the Runtime API is unreachable, while the operator (on the central host, loopback)
works and the federation's silo and run carry on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certs.node_key import generate_node_key
from certs.pki import create_ca, issue_server_cert
from silo_node.ops.launch import SiloOptions, format_node_config, start_silo
from silotune.flwr_connection import run_flwr, write_connection
from silotune.processes import ProcessGroup, python_in_netns
from superlink.ops.admission import admit_silo, list_silos
from superlink.ops.launch import SuperLinkOptions, start_superlink
from tests.support.netlab import NetLab, netns_unavailable_reason
from tests.support.waiting import wait_until

_REASON = netns_unavailable_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT, INTERNAL = 8000, 8001
REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"input": "Shares rose after strong earnings", "output": "positive"},
    {"input": "The company cut its guidance", "output": "negative"},
    {"input": "The board meets on Tuesday", "output": "neutral"},
    {"input": "Profit doubled year on year", "output": "positive"},
]

# A raw HTTPS call from inside a lab host: prints the status code, or "refused:<error>".
_HTTP = """
import ssl, sys, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=sys.argv[3]); ctx.check_hostname = False
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST",
                             headers={"Content-Type": "application/protobuf"})
try:
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError as e:
    print("refused:" + type(e).__name__)
"""


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with NetLab() as net, ProcessGroup() as group:
        central = net.add_host("central")
        create_ca(tmp_path / "ca")
        issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["superlink.lab"], [central.ip])
        ca = tmp_path / "ca" / "ca.crt"
        opts = SuperLinkOptions(
            ca_cert=ca, server_cert=tmp_path / "srv" / "server.pem",
            server_key=tmp_path / "srv" / "server.key", host="0.0.0.0", port=PORT,
            internal_port=INTERNAL, database=tmp_path / "central" / "state.db",
            events_dir=tmp_path / "central" / "events", flwr_home=tmp_path / "central" / "fh",
        )  # fmt: skip
        superlink = group.add(start_superlink(
            opts, tmp_path / "logs" / "superlink.log", netns=central.netns,
            health_address=f"{central.ip}:{PORT}", wait_timeout=120,
        ))  # fmt: skip
        operator = tmp_path / "operator" / "flwr-home"  # on the central host: loopback
        write_connection(operator, "silotune", f"127.0.0.1:{INTERNAL}", ca)
        data = tmp_path / "finance.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        yield {
            "tmp": tmp_path, "net": net, "group": group, "central": central, "ca": ca,
            "operator": operator, "superlink": superlink, "data": data,
            "public": f"{central.ip}:{PORT}",
        }  # fmt: skip


def _flwr(lab: dict[str, Any], home: Path, netns: str, args: list[str]) -> tuple[int, str]:
    res = run_flwr([*args], home, timeout=120, netns=netns, cwd=REPO)
    return res.returncode, res.stdout + res.stderr


def _json(text: str) -> dict[str, Any]:
    start = text.find("{")
    assert start >= 0, text[-2000:]
    return json.loads(text[start : text.rfind("}") + 1])


def _control_lines(lab: dict[str, Any]) -> list[str]:
    return [ln for ln in lab["superlink"].log_text().splitlines() if "/v1/control/" in ln]


def test_outsider_and_silo_cannot_operate_the_federation(lab: dict[str, Any]) -> None:
    from tests.support.tiny_model import make_tiny_llama

    tmp, central = lab["tmp"], lab["central"]
    # The operator admits a silo from the central host; the silo joins through the proxy.
    silo_host = lab["net"].add_host("hospital-a")
    nk = generate_node_key(tmp / "hospital-a" / "keys", "hospital-a")
    admitted = admit_silo(nk.public_path, "hospital-a", lab["operator"], netns=central.netns)
    policy = tmp / "hospital-a" / "policy.toml"  # the tiny model is a local directory: allowed
    policy.write_text("allow-local-paths = true\n")
    silo_opts = SiloOptions(
        superlink=lab["public"], ca_cert=lab["ca"], node_key=nk.private_path,
        node_config={"data-path": str(lab["data"]), "name": "hospital-a", "domain": "finance",
                     "policy-file": str(policy)},
        events_dir=tmp / "hospital-a" / "events", flwr_home=tmp / "hospital-a" / "flwr-home",
    )  # fmt: skip
    silo = lab["group"].add(start_silo(silo_opts, tmp / "logs" / "hospital-a.log",
                                       netns=silo_host.netns))  # fmt: skip

    def online() -> list[str]:
        silos = list_silos(lab["operator"], netns=central.netns)
        return [s.name or s.node_id for s in silos if s.status == "online"]

    assert wait_until(lambda: online() == ["hospital-a"], 150, "the admitted silo online")

    # The operator starts a run (1 round, tiny model) from the central host.
    model = make_tiny_llama(tmp / "tiny-model")
    overrides = {
        "model.name": str(model), "num-rounds": 1, "run-dir": str(tmp / "run"),
        "strategy.min-nodes": 1, "strategy.round-timeout": 300.0, "train.local-steps": 1,
        "train.batch-size": 2, "train.seq-length": 64,
    }  # fmt: skip
    rc, out = _flwr(lab, lab["operator"], central.netns,
                    ["run", str(REPO), "silotune", "--run-config", format_node_config(overrides),
                     "--format", "json"])  # fmt: skip
    submitted = _json(out)
    assert rc == 0 and submitted.get("success"), out[-2000:]
    run_id = submitted["run-id"]
    control_before = len(_control_lines(lab))
    assert control_before > 0  # the SuperLink logs Control calls (the operator's, on loopback)

    # Attackers: an outsider with the CA, and the admitted silo's host (which holds its node key).
    outsider = lab["net"].add_host("outsider")
    stranger = generate_node_key(tmp / "outsider" / "keys", "outsider")
    for host in (outsider, silo_host):
        home = tmp / host.name / "attacker-flwr-home"
        write_connection(home, "public", lab["public"], lab["ca"])
        attempts = {
            "register": ["supernode", "register", str(stranger.public_path), "public"],
            "unregister": ["supernode", "unregister", admitted.node_id, "public"],
            "list nodes": ["supernode", "list", "public"],
            "list runs": ["ls", "public"],
            "run": ["run", str(REPO), "public"],
            "stop": ["stop", str(run_id), "public"],
            "log": ["log", str(run_id), "public", "--show"],
        }
        for action, args in attempts.items():
            rc, out = _flwr(lab, home, host.netns, args)
            assert rc != 0, f"{host.name}: `flwr {action}` succeeded through the public port: {out}"
            assert "403" in out or "Forbidden" in out or "only the Fleet API" in out, (action, out)
        # The Runtime API: the proxy refuses it; the SuperLink's own port is loopback only.
        for path in ("/v1/runtime/pull-task-input", "/v1/runtime/get-run", "/v1/control/list-runs",
                     "/v1/fleet/../runtime/get-run", "/docs"):  # fmt: skip
            res = python_in_netns(host.netns, _HTTP, [f"https://{lab['public']}{path}", "", str(lab["ca"])])
            assert res.stdout.strip() in ("403", "404"), (host.name, path, res.stdout, res.stderr)
        res = python_in_netns(host.netns, _HTTP, [f"https://{central.ip}:{INTERNAL}/v1/runtime/get-run",
                                                  "", str(lab["ca"])])  # fmt: skip
        assert res.stdout.strip().startswith("refused:"), res.stdout + res.stderr

    # None of it reached the SuperLink's Control API; the silo and the run carried on.
    assert len(_control_lines(lab)) == control_before
    assert online() == ["hospital-a"]
    assert {s.node_id for s in list_silos(lab["operator"], netns=central.netns)} == {admitted.node_id}

    def finished() -> str | None:
        rc, out = _flwr(lab, lab["operator"], central.netns,
                        ["ls", "silotune", "--run-id", str(run_id), "--format", "json"])  # fmt: skip
        runs = _json(out).get("runs", []) if rc == 0 else []
        status = runs[0]["status"] if runs else ""
        return status if status.startswith("finished") else None

    assert wait_until(finished, 480, f"run {run_id} to finish", interval=5) == "finished:completed"
    # The operator's own log and stop work on loopback.
    rc, out = _flwr(lab, lab["operator"], central.netns, ["log", str(run_id), "silotune", "--show"])
    assert rc == 0, out[-2000:]
    lab["superlink"].check()
    silo.check()
