"""A multi-host federation in network namespaces: real TLS across veth links, node auth, refusals.

One namespace runs the SuperLink, each silo has its own. Every misconfigured silo must be refused
with a clear message while the admitted silos stay connected (and, in the last test, train).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certs.node_key import generate_node_key
from certs.pki import create_ca, issue_server_cert
from silo_node.ops.launch import SiloOptions, start_silo
from silotune.errors import UserError
from silotune.flwr_connection import run_flwr, write_connection
from silotune.processes import ManagedProcess, ProcessFailed, ProcessGroup
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

PORT = 8000  # per-namespace port space: no collision with anything on the machine
REPO = Path(__file__).resolve().parents[1]
SILOS = ("hospital-a", "hospital-b")
FINANCE_ROWS = [
    {"input": "Shares rose after strong earnings", "output": "positive"},
    {"input": "The company cut its guidance", "output": "negative"},
    {"input": "The board meets on Tuesday", "output": "neutral"},
    {"input": "Profit doubled year on year", "output": "positive"},
    {"input": "Sales fell sharply in the quarter", "output": "negative"},
    {"input": "The CEO spoke at a conference", "output": "neutral"},
]


@pytest.fixture()
def lab_federation(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca_dir, srv_dir = tmp_path / "ca", tmp_path / "srv"
    with NetLab() as lab, ProcessGroup() as group:
        link = lab.add_host("link", extra_ips=1)  # the extra address is NOT in the SANs
        create_ca(ca_dir)
        create_ca(tmp_path / "other-ca")
        issue_server_cert(ca_dir, srv_dir, ["superlink.lab"], [link.ip])
        ca = ca_dir / "ca.crt"
        opts = SuperLinkOptions(
            ca_cert=ca, server_cert=srv_dir / "server.pem", server_key=srv_dir / "server.key",
            host="0.0.0.0", port=PORT, database=tmp_path / "link" / "state.db",
            events_dir=tmp_path / "link" / "events", flwr_home=tmp_path / "link" / "flwr-home",
        )  # fmt: skip
        superlink = group.add(
            start_superlink(
                opts,
                tmp_path / "logs" / "superlink.log",
                netns=link.netns,
                health_address=f"{link.ip}:{PORT}",
                wait_timeout=120,
            )  # fmt: skip
        )
        home = tmp_path / "operator" / "flwr-home"
        # Operator commands run on the SuperLink's host, on loopback: the public port (the Fleet
        # proxy) refuses the Control API.
        write_connection(home, "silotune", f"127.0.0.1:{PORT + 1}", ca)
        data = tmp_path / "finance.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in FINANCE_ROWS))
        yield {
            "tmp": tmp_path, "lab": lab, "group": group, "link": link, "ca": ca, "home": home,
            "superlink": superlink, "data": data, "address": f"{link.ip}:{PORT}",
        }  # fmt: skip


def _local_model_policy(tmp: Path) -> Path:
    """The tiny model is a local directory, which a silo loads only when its policy allows it."""
    path = tmp / "local-model-policy.toml"
    path.write_text("allow-local-paths = true\n")
    return path


def _silo(
    fed: dict[str, Any], name: str, *, key: Path | None, ca: Path | None, address: str | None = None,
    insecure: bool = False, preflight: bool = True, check: bool = True,
) -> ManagedProcess:  # fmt: skip
    host = fed["lab"].hosts.get(name) or fed["lab"].add_host(name)
    opts = SiloOptions(
        superlink=address or fed["address"], ca_cert=ca, node_key=key, insecure=insecure,
        node_config={"data-path": str(fed["data"]), "name": name, "domain": "finance",
                     "policy-file": str(_local_model_policy(fed["tmp"]))},
        events_dir=fed["tmp"] / name / "events", max_wait_time=None if preflight else 20,
        flwr_home=fed["tmp"] / name / "flwr-home",
    )  # fmt: skip
    log = fed["tmp"] / "logs" / f"{name}.log"
    proc = start_silo(opts, log, netns=host.netns, check=check, preflight=preflight)
    return fed["group"].add(proc)


def _online(fed: dict[str, Any]) -> list[str]:
    silos = list_silos(fed["home"], netns=fed["link"].netns)
    return sorted(s.name or s.node_id for s in silos if s.status == "online")


def _start_admitted(fed: dict[str, Any]) -> dict[str, ManagedProcess]:
    procs = {}
    for name in SILOS:
        # The key is made at the silo; only the .pub goes to the operator, who admits it.
        nk = generate_node_key(fed["tmp"] / name / "keys", name)
        admit_silo(nk.public_path, name, fed["home"], netns=fed["link"].netns)
        procs[name] = _silo(fed, name, key=nk.private_path, ca=fed["ca"])
    return procs


def test_refused_silos_do_not_stop_the_federation(lab_federation: dict[str, Any]) -> None:
    fed, tmp = lab_federation, lab_federation["tmp"]
    good = _start_admitted(fed)
    keys = {n: generate_node_key(tmp / n / "keys", n) for n in ("unreg", "wrongca", "plain", "san")}

    # 1. Unregistered key: TLS is fine, the SuperLink refuses the node (412), the node exits (305).
    unreg = _silo(fed, "unreg", key=keys["unreg"].private_path, ca=fed["ca"])
    # 2-4. The launcher refuses before connecting, with a message that says what to fix.
    other_ca = tmp / "other-ca" / "ca.crt"
    with pytest.raises(UserError, match="not signed by the CA"):
        _silo(fed, "wrongca", key=keys["wrongca"].private_path, ca=other_ca)
    with pytest.raises(UserError, match="requires TLS but this silo was started with --insecure"):
        _silo(fed, "plain", key=None, ca=None, insecure=True)
    bad_name = f"{fed['lab'].extra_ip(fed['link'])}:{PORT}"
    with pytest.raises(UserError, match="not valid for .* SANs"):
        _silo(fed, "san", key=keys["san"].private_path, ca=fed["ca"], address=bad_name)
    # ... and Flower itself refuses them too when the launcher's check is bypassed.
    raw = {
        "wrongca": _silo(fed, "wrongca", key=keys["wrongca"].private_path, ca=other_ca,
                         preflight=False),
        "plain": _silo(fed, "plain", key=None, ca=None, insecure=True, preflight=False),
        "san": _silo(fed, "san", key=keys["san"].private_path, ca=fed["ca"], address=bad_name,
                     preflight=False),
    }  # fmt: skip

    assert wait_until(lambda: _online(fed) == list(SILOS), 150, "admitted silos online")
    wait_until(lambda: not unreg.running(), 120, "the unregistered SuperNode to exit")
    with pytest.raises(ProcessFailed) as err:
        unreg.check()
    assert err.value.flower_code == 305 and str(unreg.log_path) in str(err.value)
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in fed["superlink"].log_text()
    for name, proc in raw.items():
        # --max-wait-time 20: they give up without ever being activated.
        wait_until(lambda p=proc: not p.running(), 120, f"{name} SuperNode to give up")
        assert proc.returncode != 0, name
    # The federation carried on: SuperLink and admitted silos running, still online.
    fed["superlink"].check()
    for proc in good.values():
        proc.check()
    assert _online(fed) == list(SILOS)


def _flwr(fed: dict[str, Any], args: list[str], timeout: float = 120) -> dict[str, Any]:
    # The operator's CLI runs on the SuperLink's host: lab addresses are unreachable from the
    # root namespace by design.
    res = run_flwr([*args, "--format", "json"], fed["home"], timeout=timeout,
                   netns=fed["link"].netns, cwd=REPO)  # fmt: skip
    start = res.stdout.find("{")
    assert start >= 0, f"flwr {args[0]} printed no JSON: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    return json.loads(res.stdout[start:])


def test_rounds_complete_across_hosts_despite_refused_silo(lab_federation: dict[str, Any]) -> None:
    from silo_node.ops.launch import format_node_config
    from tests.support.tiny_model import make_tiny_llama

    fed, tmp = lab_federation, lab_federation["tmp"]
    model = make_tiny_llama(tmp / "tiny-model")
    good = _start_admitted(fed)
    intruder = generate_node_key(tmp / "intruder" / "keys", "intruder")
    unreg = _silo(fed, "intruder", key=intruder.private_path, ca=fed["ca"])
    assert wait_until(lambda: _online(fed) == list(SILOS), 150, "admitted silos online")

    run_dir = tmp / "run"
    overrides = {
        "model.name": str(model), "num-rounds": 2, "run-dir": str(run_dir),
        "strategy.min-nodes": 2, "strategy.round-timeout": 300.0, "train.local-steps": 1,
        "train.batch-size": 2, "train.seq-length": 64,
    }  # fmt: skip
    submitted = _flwr(fed, ["run", str(REPO), "silotune", "--run-config",
                            format_node_config(overrides)])  # fmt: skip
    assert submitted.get("success"), submitted
    run_id = submitted["run-id"]

    def finished() -> str | None:
        runs = _flwr(fed, ["ls", "silotune", "--run-id", str(run_id)]).get("runs", [])
        status = runs[0]["status"] if runs else ""
        return status if status.startswith("finished") else None

    status = wait_until(finished, 480, f"run {run_id} to finish", interval=5)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["kind"] == "round_end"]
    assert status == "finished:completed", (status, events[-3:])
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["answered"] == 2 for r in rounds), rounds
    # The refused silo never took part, and did not stop anyone.
    assert not unreg.running() and unreg.returncode != 0
    fed["superlink"].check()
    for proc in good.values():
        proc.check()
