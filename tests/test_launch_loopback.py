"""Real processes on loopback: a TLS SuperLink with node auth admits registered silos only."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certs.node_key import generate_node_key
from certs.pki import create_ca, issue_server_cert
from command_line.main import main
from silo_node.ops.launch import SiloOptions, diagnose_tls, start_silo
from silotune.errors import UserError
from silotune.flwr_connection import write_connection
from silotune.processes import ManagedProcess, ProcessFailed, ProcessGroup, start_process
from superlink.ops.admission import admit_silo, list_silos, remove_silo
from superlink.ops.launch import SuperLinkOptions, start_superlink
from superlink.ops.proxy import read_access_log
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[dict[str, Any]]:
    create_ca(tmp_path / "ca")
    # Only the IP in the SANs, so "localhost" is a name mismatch (tested below).
    issue_server_cert(tmp_path / "ca", tmp_path / "srv", [], ["127.0.0.1"])
    port, internal = free_port(), free_port()
    address = f"127.0.0.1:{port}"  # the Fleet proxy (public side): silos connect here
    operator = f"127.0.0.1:{internal}"  # the SuperLink itself: operator commands
    ca = tmp_path / "ca" / "ca.crt"
    home = tmp_path / "ws" / "flwr-home"
    write_connection(home, "silotune", operator, ca)
    data = tmp_path / "data.jsonl"  # not read: these tests skip the data check
    data.write_text("{}\n")
    with ProcessGroup() as group:
        opts = SuperLinkOptions(
            ca_cert=ca, server_cert=tmp_path / "srv" / "server.pem",
            server_key=tmp_path / "srv" / "server.key", host="127.0.0.1", port=port,
            internal_port=internal,
            database=tmp_path / "ws" / "state.db", events_dir=tmp_path / "ws" / "events",
            flwr_home=tmp_path / "ws" / "superlink-home",
        )  # fmt: skip
        superlink = group.add(start_superlink(opts, tmp_path / "logs" / "superlink.log"))
        yield {
            "tmp": tmp_path, "address": address, "operator": operator, "ca": ca, "home": home,
            "group": group,
            "superlink": superlink, "data": data,
        }  # fmt: skip


def _start_node(fed: dict[str, Any], name: str, key: Path, **kw: Any) -> ManagedProcess:
    opts = SiloOptions(
        superlink=kw.pop("superlink", fed["address"]), ca_cert=kw.pop("ca", fed["ca"]),
        node_key=key, runtime_port=free_port(), max_wait_time=kw.pop("max_wait_time", None),
        node_config={"data-path": str(fed["data"]), "name": name},
        flwr_home=fed["tmp"] / name / "flwr-home",
    )  # fmt: skip
    log = fed["tmp"] / "logs" / f"{name}.log"
    return fed["group"].add(start_silo(opts, log, check=False, **kw))


def test_registered_silos_connect_unregistered_refused(federation: dict[str, Any]) -> None:
    fed, tmp = federation, federation["tmp"]
    keys = {n: generate_node_key(tmp / n, n) for n in ("hospital-a", "hospital-b", "intruder")}
    admitted = {n: admit_silo(keys[n].public_path, n, fed["home"]) for n in keys if n != "intruder"}
    nodes = {n: _start_node(fed, n, k.private_path) for n, k in keys.items()}

    def online() -> list[str]:
        return sorted(s.name for s in list_silos(fed["home"]) if s.status == "online" and s.name)

    assert wait_until(lambda: online() == ["hospital-a", "hospital-b"], 90, "both silos online")
    by_name = {s.name: s for s in list_silos(fed["home"])}
    assert by_name["hospital-a"].node_id == admitted["hospital-a"].node_id
    assert by_name["hospital-a"].fingerprint == keys["hospital-a"].fingerprint

    # The unregistered key is refused: the SuperLink answers 412, the SuperNode gives up (305).
    intruder = nodes["intruder"]
    wait_until(lambda: not intruder.running(), 90, "the unregistered SuperNode to exit")
    with pytest.raises(ProcessFailed) as err:
        intruder.check()
    assert err.value.flower_code == 305 and "refused" in str(err.value)
    assert str(intruder.log_path) in str(err.value)
    sl_log = fed["superlink"].log_text()
    assert 'activate-node HTTP/1.1" 412' in sl_log and "No SuperNode found" in sl_log
    # ... and the federation carries on for the admitted silos.
    assert nodes["hospital-a"].running() and nodes["hospital-b"].running()
    fed["superlink"].check()

    # Removing a silo by name unregisters its node id and forgets it.
    removed = remove_silo("hospital-b", fed["home"])
    assert removed == admitted["hospital-b"].node_id
    assert "hospital-b" not in {s.name for s in list_silos(fed["home"])}
    with pytest.raises(UserError, match="already admitted as 'hospital-a'"):
        admit_silo(keys["hospital-a"].public_path, "hospital-c", fed["home"])


def test_cli_admit_and_list(federation: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    fed = federation
    nk = generate_node_key(fed["tmp"] / "k", "bank-1")
    ws = str(fed["tmp"] / "cli-ws")
    # The public (proxy) address refuses the Control API: admitting through it fails.
    public = ["--workspace", ws, "--superlink", fed["address"], "--ca", str(fed["ca"])]
    assert main(["silos", "admit", str(nk.public_path), "--name", "bank-1", *public]) == 2
    assert "403" in capsys.readouterr().err
    # ... and the proxy's access log (on by default, beside the SuperLink's log) records it.
    access = fed["tmp"] / "logs" / "superlink-proxy-access.log"
    refused = wait_until(
        lambda: [e for e in read_access_log(access) if e["status"] == 403], 30, "a 403 in the access log", 0.5
    )
    assert refused[0]["path"].startswith("/v1/control/") and refused[0]["client"].startswith("127.0.0.1:")
    assert refused[0]["wire_bytes_received"] > 0 and refused[0]["wire_bytes_sent"] > 0
    common = ["--workspace", ws, "--superlink", fed["operator"], "--ca", str(fed["ca"])]
    assert main(["silos", "admit", str(nk.public_path), "--name", "bank-1", *common]) == 0
    out = capsys.readouterr().out
    assert nk.fingerprint in out
    assert main(["silos", "list", "--workspace", ws]) == 0  # connection remembered
    out = capsys.readouterr().out
    assert "bank-1" in out and "registered" in out
    assert main(["silos", "admit", str(nk.private_path), "--name", "x", "--workspace", ws]) == 2
    assert "PRIVATE key" in capsys.readouterr().err
    assert main(["silos", "remove", "bank-1", "--workspace", ws]) == 0


def test_tls_preflight_explains_wrong_ca_and_san_mismatch(federation: dict[str, Any]) -> None:
    fed, tmp = federation, federation["tmp"]
    create_ca(tmp / "other-ca")
    port = fed["address"].rsplit(":", 1)[1]
    assert diagnose_tls(fed["address"], fed["ca"]) is None
    wrong_ca = diagnose_tls(fed["address"], tmp / "other-ca" / "ca.crt")
    assert wrong_ca and "not signed by the CA" in wrong_ca
    mismatch = diagnose_tls(f"localhost:{port}", fed["ca"])
    assert mismatch and "not valid for 'localhost'" in mismatch and "SANs" in mismatch
    plaintext = diagnose_tls(fed["address"], None)
    assert plaintext and "requires TLS" in plaintext
    nk = generate_node_key(tmp / "k", "lab")
    with pytest.raises(UserError, match="silo lab: the SuperLink's certificate is not signed"):
        _start_node(fed, "lab", nk.private_path, ca=tmp / "other-ca" / "ca.crt")


def _pids_with(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                out.append(int(entry.name))
    return out


def test_cli_superlink_and_refused_silo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from silotune.processes import start_process, wait_for_superlink

    create_ca(tmp_path / "certs")
    issue_server_cert(tmp_path / "certs", tmp_path / "certs", ["localhost"], [])
    port, metrics_port, silo_metrics = free_port(), free_port(), free_port()
    internal = free_port()
    ws = tmp_path / "ws"
    cli = start_process(
        "silotune superlink start",
        [sys.executable, "-m", "command_line.main", "superlink", "start", "--certs-dir",
         str(tmp_path / "certs"), "--host", "127.0.0.1", "--port", str(port),
         "--internal-port", str(internal),
         "--workspace", str(ws), "--log-file", str(tmp_path / "superlink.log"),
         "--exporter", f"127.0.0.1:{metrics_port}"],
        tmp_path / "cli.log",
    )  # fmt: skip
    try:
        wait_for_superlink(f"localhost:{port}", tmp_path / "certs" / "ca.crt", 90, process=cli)
        assert (ws / "superlink" / "state.db").exists()  # persistent state in the workspace
        # The proxy's access log beside --log-file: the readiness probes on the public port are in it.
        access = tmp_path / "superlink-proxy-access.log"
        health = wait_until(lambda: read_access_log(access), 30, "the proxy's access log", 0.5)
        assert any(e["path"] == "/health" and e["status"] == 200 for e in health), health
        # The operator connection was saved, pointing at the SuperLink's loopback port.
        config = ws / "flwr-home" / "config.toml"
        wait_until(lambda: config.exists() and "127.0.0.1" in config.read_text(), 30, "connection")
        assert main(["silos", "list", "--workspace", str(ws)]) == 0
        assert "no silos admitted" in capsys.readouterr().out
        assert f"127.0.0.1:{internal}" in (ws / "flwr-home" / "config.toml").read_text()
        # --exporter: the central exporter serves the SuperLink's metrics beside it.
        wait_until(lambda: _pids_with(f"--bind 127.0.0.1:{metrics_port}"), 60, "the exporter to start")
        body = wait_until(lambda: _get_text(f"http://127.0.0.1:{metrics_port}/metrics"), 60, "/metrics")
        assert "silotune_" in body
        data = tmp_path / "fin.jsonl"
        data.write_text('{"input": "Shares rose", "output": "positive"}\n' * 3)
        nk = generate_node_key(tmp_path / "silo", "lab-1")
        rc = main([
            "silo", "start", "--superlink", f"localhost:{port}",
            "--ca", str(tmp_path / "certs" / "ca.crt"), "--node-key", str(nk.private_path),
            "--data-path", str(data), "--name", "lab-1", "--domain", "finance",
            "--runtime-port", str(free_port()), "--workspace", str(tmp_path / "silo-ws"),
            "--log-file", str(tmp_path / "node.log"), "--exporter", f"127.0.0.1:{silo_metrics}",
        ])  # fmt: skip
        captured = capsys.readouterr()
        assert rc == 2 and "admit your .pub" in captured.err and nk.fingerprint in captured.err
        # Its exporter ran beside it and went down with it.
        assert f"metrics: http://127.0.0.1:{silo_metrics}/metrics" in captured.out
        assert not _pids_with(f"--bind 127.0.0.1:{silo_metrics}")
        # Bad data is caught before connecting, naming the file.
        rc = main([
            "silo", "start", "--superlink", f"localhost:{port}",
            "--ca", str(tmp_path / "certs" / "ca.crt"), "--node-key", str(nk.private_path),
            "--data-path", str(tmp_path / "missing.jsonl"), "--domain", "finance",
        ])  # fmt: skip
        assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    finally:
        # SIGTERM to the CLI must take the SuperLink and its superexec child down with it.
        os.kill(cli.pid, signal.SIGTERM)
        cli.wait(timeout=30)
        cli.stop()
    assert cli.returncode == 0
    wait_until(lambda: not _pids_with(f"--port {internal}"), 20, "SuperLink processes to exit")
    assert not _pids_with(f"127.0.0.1:{internal}")  # no flower-superexec left behind
    with pytest.raises(OSError):  # the Fleet proxy went down with it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    wait_until(lambda: not _pids_with(f"--bind 127.0.0.1:{metrics_port}"), 20, "the exporter to exit")


def _get_text(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


# libfaketime (apt: faketime) shifts the wall clock of one process tree only. Its spec is read from
# a file on every clock call, so a test can move a running silo's clock.
FAKETIME_LIB = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), Path("/nonexistent"))
needs_faketime = pytest.mark.skipif(
    not FAKETIME_LIB.is_file() and not os.environ.get("CI"),
    reason="libfaketime not installed (apt: faketime)",
)

# The SuperLink's Date header has 1 s resolution: 60 s of skew reads as 59-61.
AHEAD_60 = r"this machine's clock is (59|60|61) s ahead of the SuperLink's"


def _skewed_silo_cli(fed: dict[str, Any], name: str, skew: str) -> tuple[ManagedProcess, Path, Path]:
    """`silotune silo start` for an admitted key, in a process tree whose clock is off by ``skew``
    (libfaketime syntax, e.g. "+60s"). Returns the CLI, the SuperNode's log and the clock file,
    which the test may rewrite to move the clock while the silo runs."""
    tmp = fed["tmp"]
    clock_file = tmp / f"{name}.clock"
    clock_file.write_text(skew + "\n")
    key = generate_node_key(tmp / name, name)
    admit_silo(key.public_path, name, fed["home"])
    data = tmp / f"{name}.jsonl"
    data.write_text('{"input": "Shares rose", "output": "positive"}\n' * 3)
    env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME_TIMESTAMP_FILE": str(clock_file),
           "FAKETIME_NO_CACHE": "1"}  # fmt: skip
    node_log = tmp / "logs" / f"{name}-supernode.log"
    argv = [
        sys.executable, "-m", "command_line.main", "silo", "start", "--superlink", fed["address"],
        "--ca", str(fed["ca"]), "--node-key", str(key.private_path), "--data-path", str(data),
        "--name", name, "--domain", "finance", "--runtime-port", str(free_port()),
        "--workspace", str(tmp / f"{name}-ws"), "--log-file", str(node_log),
    ]  # fmt: skip
    cli = fed["group"].add(
        start_process(f"silo start {name}", argv, tmp / "logs" / f"{name}-cli.log", env=env)
    )
    return cli, node_log, clock_file


def _online(fed: dict[str, Any], name: str) -> bool:
    return any(s.name == name and s.status == "online" for s in list_silos(fed["home"]))


@needs_faketime
def test_silo_clock_ahead_is_refused_before_connecting(federation: dict[str, Any]) -> None:
    """Flower refuses requests signed > 5 s in the SuperLink's future; the preflight says so."""
    fed = federation
    cli, _, _ = _skewed_silo_cli(fed, "fast-clock", "+60s")
    assert cli.wait(120) == 2
    out = cli.log_text()
    assert re.search("silo fast-clock: " + AHEAD_60, out), out
    assert "NTP" in out
    assert "activate-node" not in fed["superlink"].log_text()  # refused before connecting


@needs_faketime
def test_silo_clock_that_drifts_mid_run_is_named_when_the_supernode_stops(federation: dict[str, Any]) -> None:
    """A clock that jumps ahead after the silo joined: the SuperLink answers 401, the SuperNode
    exits 0 without a word, and `silo start` explains it instead of reporting success."""
    fed = federation
    cli, node_log, clock = _skewed_silo_cli(fed, "drifting", "+0")
    wait_until(lambda: _online(fed, "drifting"), 90, "the silo to join with a correct clock")
    clock.write_text("+60s\n")
    assert cli.wait(120) == 2
    out = cli.log_text()
    assert re.search("the SuperNode stopped: " + AHEAD_60, out), out
    assert '" 401' in fed["superlink"].log_text()
    # Why the SuperNode's own log is no help (\b: node ids and ports are digit strings too).
    assert not re.search(r"\b401\b|[Uu]nauthori[sz]ed|timestamp", node_log.read_text())


@needs_faketime
def test_silo_clock_behind_inside_the_window_is_accepted(federation: dict[str, Any]) -> None:
    """Flower accepts signatures up to 305 s old, so a silo 60 s behind joins (no false refusal)."""
    fed = federation
    cli, _, _ = _skewed_silo_cli(fed, "slow-clock", "-60s")
    wait_until(lambda: _online(fed, "slow-clock"), 90, "the silo 60 s behind to join")
    assert cli.running()
