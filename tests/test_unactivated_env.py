"""`silotune` run by its absolute path from an environment that was never activated (systemd, cron,
a container entrypoint): every Flower program it starts is found beside its interpreter."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from certs.node_key import generate_node_key
from certs.pki import create_ca, issue_server_cert
from silotune.flwr_connection import interpreter_bin
from silotune.processes import ProcessGroup, wait_for_superlink
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow
SILOTUNE = interpreter_bin() / "silotune"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare_env(home: Path) -> dict[str, str]:
    """No virtual environment on PATH, nothing activated: what a systemd unit gets."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", HOME=str(home))
    return env


@pytest.mark.skipif(not SILOTUNE.exists(), reason=f"{SILOTUNE} not installed (pip install -e .)")
def test_superlink_admit_and_silo_work_with_a_path_that_lacks_the_environment(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    assert subprocess.run(["sh", "-c", "command -v flower-superlink"], env=env).returncode != 0
    certs = tmp_path / "certs"
    create_ca(certs)
    issue_server_cert(certs, certs, ["localhost"], [])
    port = free_port()
    address = f"localhost:{port}"
    with ProcessGroup() as group:
        central = group.start(
            "silotune superlink start",
            [str(SILOTUNE), "superlink", "start", "--certs-dir", str(certs), "--host", "127.0.0.1",
             "--port", str(port), "--workspace", str(tmp_path / "central"),
             "--log-file", str(tmp_path / "superlink.log")],
            tmp_path / "central.log",
            env=env,
        )  # fmt: skip
        wait_for_superlink(address, certs / "ca.crt", 90, process=central)
        key = generate_node_key(tmp_path / "silo-key", "lab-1")
        # As the operator does on the central host: the workspace's saved connection is the
        # SuperLink's loopback port (the public address is the Fleet proxy, which refuses admits).
        # `superlink start` saves it just after the SuperLink answers.
        saved = tmp_path / "central" / "flwr-home" / "config.toml"
        wait_until(lambda: central.check() or saved.exists(), 60, "the operator connection", 0.2)
        admit = subprocess.run(
            [str(SILOTUNE), "silos", "admit", str(key.public_path), "--name", "lab-1",
             "--workspace", str(tmp_path / "central")],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert admit.returncode == 0, admit.stdout + admit.stderr
        data = tmp_path / "fin.jsonl"
        data.write_text('{"input": "Shares rose", "output": "positive"}\n' * 3)
        silo = group.start(
            "silotune silo start",
            [str(SILOTUNE), "silo", "start", "--superlink", address, "--ca", str(certs / "ca.crt"),
             "--node-key", str(key.private_path), "--data-path", str(data), "--name", "lab-1",
             "--domain", "finance", "--runtime-port", str(free_port()),
             "--workspace", str(tmp_path / "silo"), "--log-file", str(tmp_path / "node.log")],
            tmp_path / "silo.log",
            env=env,
        )  # fmt: skip

        def online() -> bool:
            silo.check()  # a launcher that died (e.g. "flower-supernode not found") fails at once
            out = subprocess.run(
                [str(SILOTUNE), "silos", "list", "--workspace", str(tmp_path / "central")],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            rows = [line.split() for line in out.stdout.splitlines()]
            return out.returncode == 0 and any(r[:1] == ["lab-1"] and "online" in r for r in rows)

        assert wait_until(online, 120, "the silo to come online")
