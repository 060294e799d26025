"""Launchers without a network: argv building, refusals, node config, the process manager."""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path

import pytest

from certs.node_key import generate_node_key
from certs.pki import create_ca, issue_server_cert
from silo_node.ops.cli import parse_node_config_text
from silo_node.ops.launch import (
    SiloOptions,
    build_supernode_argv,
    format_node_config,
    prepare_node_config,
)
from silotune.config import ConfigError
from silotune.errors import UserError
from silotune.flwr_connection import read_connection, write_connection
from silotune.processes import ProcessFailed, ProcessGroup, start_process, wait_for_superlink
from superlink.ops.launch import SuperLinkOptions, build_superlink_argv, superlink_env


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    create_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["localhost"], ["127.0.0.1"])
    nk = generate_node_key(tmp_path / "silo", "hospital-a")
    return {
        "ca": tmp_path / "ca" / "ca.crt",
        "cert": tmp_path / "srv" / "server.pem",
        "key": tmp_path / "srv" / "server.key",
        "node_key": nk.private_path,
    }


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_superlink_argv_tls_and_node_auth(pki: dict[str, Path], tmp_path: Path) -> None:
    opts = SuperLinkOptions(
        ca_cert=pki["ca"], server_cert=pki["cert"], server_key=pki["key"],
        host="0.0.0.0", port=9443, database=tmp_path / "state.db",
    )  # fmt: skip
    argv = build_superlink_argv(opts)
    assert argv[0] == "flower-superlink"
    assert _flag(argv, "--ssl-ca-certfile") == str(pki["ca"].resolve())
    assert _flag(argv, "--ssl-certfile") == str(pki["cert"].resolve())
    assert _flag(argv, "--ssl-keyfile") == str(pki["key"].resolve())
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert _flag(argv, "--database") == str((tmp_path / "state.db").resolve())
    # Behind the Fleet proxy (which listens on 0.0.0.0:9443) the SuperLink binds loopback only.
    assert _flag(argv, "--host") == "127.0.0.1" and _flag(argv, "--port") == "9444"
    # --no-proxy: the SuperLink binds the public address itself (development only).
    argv = build_superlink_argv(SuperLinkOptions(**{**opts.__dict__, "proxy": False}))
    assert _flag(argv, "--host") == "0.0.0.0" and _flag(argv, "--port") == "9443"


def test_superlink_env_is_air_gapped(tmp_path: Path) -> None:
    env = superlink_env(SuperLinkOptions(events_dir=tmp_path / "ev"), base={})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["SILOTUNE_EVENTS_DIR"] == str((tmp_path / "ev").resolve())


def test_superlink_refuses_plaintext_unless_asked(pki: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="explicit --insecure"):
        build_superlink_argv(SuperLinkOptions())
    with pytest.raises(UserError, match="--key"):
        build_superlink_argv(SuperLinkOptions(ca_cert=pki["ca"], server_cert=pki["cert"]))
    argv = build_superlink_argv(SuperLinkOptions(insecure=True))
    assert "--insecure" in argv
    assert "--enable-supernode-auth" not in argv  # Flower refuses the combination
    assert not any(a.startswith("--ssl") for a in argv)


def test_superlink_missing_cert_file(pki: dict[str, Path], tmp_path: Path) -> None:
    opts = SuperLinkOptions(ca_cert=pki["ca"], server_cert=tmp_path / "nope.pem",
                            server_key=pki["key"])  # fmt: skip
    with pytest.raises(UserError, match="nope.pem not found"):
        build_superlink_argv(opts)


def test_supernode_argv(pki: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    cfg, silo = prepare_node_config(
        {"data-path": str(data), "name": "hospital-a", "lora_rank": 4, "columns": "", "domain": None}
    )
    assert silo.name == "hospital-a" and silo.lora_rank == 4
    assert cfg == {"data-path": str(data.resolve()), "name": "hospital-a", "lora-rank": 4}
    opts = SiloOptions(superlink="superlink.test:8000", ca_cert=pki["ca"],
                       node_key=pki["node_key"], runtime_port=9190)  # fmt: skip
    argv = build_supernode_argv(opts, cfg)
    assert argv[:3] == ["flower-supernode", "--superlink", "superlink.test:8000"]
    assert _flag(argv, "--root-certificates") == str(pki["ca"].resolve())
    assert _flag(argv, "--auth-supernode-private-key") == str(pki["node_key"].resolve())
    assert _flag(argv, "--port") == "9190" and "--insecure" not in argv
    assert parse_node_config_text(_flag(argv, "--node-config")) == cfg


def test_supernode_refuses_plaintext_and_missing_identity(pki: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="--ca"):
        build_supernode_argv(SiloOptions(superlink="h:1", node_key=pki["node_key"]), {})
    with pytest.raises(UserError, match="--node-key"):
        build_supernode_argv(SiloOptions(superlink="h:1", ca_cert=pki["ca"]), {})
    with pytest.raises(UserError, match="node authentication needs TLS"):
        build_supernode_argv(SiloOptions(superlink="h:1", insecure=True, node_key=pki["node_key"]), {})
    with pytest.raises(UserError, match="HOST:PORT"):
        build_supernode_argv(SiloOptions(superlink="https://h", insecure=True), {})
    argv = build_supernode_argv(SiloOptions(superlink="h:1", insecure=True), {})
    assert "--insecure" in argv and "--root-certificates" not in argv


def test_node_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="data-path"):
        prepare_node_config({"name": "x"})
    with pytest.raises(ConfigError, match="lora-rank"):
        prepare_node_config({"data-path": "/d.jsonl", "lora-rank": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        prepare_node_config({"data-path": "/d.jsonl", "bogus": 1})
    # A hub dataset id is not turned into a local path.
    cfg, _ = prepare_node_config({"data-path": "FinGPT/fingpt-sentiment-train"})
    assert cfg["data-path"] == "FinGPT/fingpt-sentiment-train"


def test_node_config_round_trips_through_flower_syntax() -> None:
    cfg = {"data-path": "/data/my file.jsonl", "columns": 'instruction=q,output="a"',
           "label-map": "0=negative,1=positive", "lora-rank": 8, "eval-fraction": 0.1,
           "flag": True}  # fmt: skip
    text = format_node_config(cfg)
    assert parse_node_config_text(text) == cfg
    # Flower's own parser agrees (this is what the SuperNode does with the string).
    from flwr.common.config import parse_config_args

    assert parse_config_args([text]) == cfg
    with pytest.raises(UserError, match="both"):
        format_node_config({"x": 'it\'s "quoted"'})


def test_flwr_connection_round_trip(tmp_path: Path, pki: dict[str, Path]) -> None:
    home = tmp_path / "flwr"
    path = write_connection(home, "kit", "superlink.test:8000", pki["ca"])
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == "kit"
    assert data["superlink"]["kit"] == {
        "address": "superlink.test:8000", "root-certificates": str(pki["ca"].resolve())
    }  # fmt: skip
    write_connection(home, "dev", "127.0.0.1:8000", None, insecure=True, make_default=False)
    assert read_connection(home).name == "kit"
    dev = read_connection(home, "dev")
    assert dev.insecure and dev.root_certificates is None
    with pytest.raises(UserError, match="explicit --insecure"):
        write_connection(home, "x", "h:1", None)
    with pytest.raises(UserError, match="no SuperLink connection"):
        read_connection(tmp_path / "empty")


# --- the process manager -------------------------------------------------------------------------

_SPAWNER = """
import subprocess, sys, time
# A child that ignores SIGTERM, like a slow-to-die flower-superexec.
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_kills_the_whole_group(tmp_path: Path) -> None:
    log = tmp_path / "spawner.log"
    proc = start_process("spawner", [sys.executable, "-c", _SPAWNER], log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not log.read_text().strip():
        time.sleep(0.1)
    child = int(log.read_text().split()[0])
    assert _alive(child) and os.getpgid(child) == proc.pid
    t0 = time.monotonic()
    proc.stop(grace=1.0)
    assert time.monotonic() - t0 < 10
    assert not proc.running() and not _alive(child)


def test_group_reports_crashed_child_with_log(tmp_path: Path) -> None:
    log = tmp_path / "crash.log"
    with pytest.raises(ProcessFailed) as err, ProcessGroup() as group:
        ok = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                         tmp_path / "ok.log")  # fmt: skip
        group.start("SuperNode bad", [sys.executable, "-c", "print('boom'); raise SystemExit(7)"],
                    log)  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            group.check()
            time.sleep(0.1)
    assert err.value.name == "SuperNode bad" and err.value.returncode == 7
    assert err.value.log_path == log and str(log) in str(err.value)
    assert "boom" in log.read_text()
    assert not ok.running()  # the context manager stopped the survivor too


def test_failed_reports_flower_exit_code_from_log(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    code = "print('ERROR : Exit Code: 305'); raise SystemExit(1)"
    proc = start_process("SuperNode x", [sys.executable, "-c", code], log)
    proc.wait(timeout=20)
    with pytest.raises(ProcessFailed, match="305.*refused") as err:
        proc.check()
    assert err.value.returncode == 1 and err.value.flower_code == 305


def test_group_stops_on_keyboard_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ProcessGroup() as group:
        p = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                        tmp_path / "s.log")  # fmt: skip
        raise KeyboardInterrupt
    assert not p.running()


def test_wait_for_superlink_fails_fast_when_process_dies(tmp_path: Path) -> None:
    proc = start_process("SuperLink", [sys.executable, "-c", "raise SystemExit(3)"],
                         tmp_path / "sl.log")  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(ProcessFailed, match="SuperLink"):
        wait_for_superlink("127.0.0.1:9", None, timeout=30, process=proc)
    assert time.monotonic() - t0 < 15
