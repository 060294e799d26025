"""A second local user on a silo host cannot speak for the silo (issue 23, item 3), in real processes.

A loopback federation of two silos (SuperLink behind its Fleet proxy, each silo's flower-supernode
with --isolation process beside its executor, started by `start_silo` as `silotune silo start`
starts them) runs a tiny model for two rounds while an intruder hammers the first silo's Runtime
API (tests/support/runtime_intruder.py): AcquireTask without the secret and with a forged one,
PullTaskInput and PushTaskOutput (a context pointing the policy, data and state dir elsewhere)
with guessed tokens, and reading the secret file. When the tests run as root the intruder runs as
another uid (nobody, via setpriv); otherwise it is a separate process of the same user that was
not given the secret (a stand-in: it could read the 0600 file, so that check is skipped).

Every attempt is refused (401), the honest executor serves every round, the run completes, and
the secret's bytes appear in no log, event, audit entry or command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from demo.local_federation import LocalFederation, SiloSpec
from silo_node.app.runtime_auth import SECRET_FILE
from silotune.events import read_events
from tests.support.federation_runs import run_config, write_silo_data

pytestmark = pytest.mark.slow

INTRUDER = Path(__file__).resolve().parent / "support" / "runtime_intruder.py"
NOBODY = 65534


def _as_nobody(python: str) -> list[str]:
    return [
        "setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
        "env", "-i", "HOME=/tmp", "PYTHONDONTWRITEBYTECODE=1",
        f"PYTHONPATH={sysconfig.get_paths()['purelib']}", python,
    ]  # fmt: skip


def _intruder_prefix() -> tuple[list[str], bool]:
    """The command that starts the intruder's Python, and whether it runs as another uid."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        # This interpreter may sit where nobody can reach (e.g. under /root); a system Python of
        # the same version can import the environment's (pure and cp3xx) packages instead.
        for python in (sys.executable, f"/usr/bin/{version}", "/usr/bin/python3"):
            argv = [*_as_nobody(python), "-c", "import os, flwr.supercore.runtime; print(os.getuid())"]
            try:
                probe = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0 and probe.stdout.strip() == str(NOBODY):
                return _as_nobody(python), True
    env_python = [sys.executable]
    return env_python, False


def _runtime_port(fed: LocalFederation, index: int) -> int:
    """The silo's Runtime API port, from its supervisor's command line."""
    argv = list(fed.group.processes[1 + index].popen.args)
    supernode = json.loads(argv[argv.index("--supernode") + 1])
    return int(supernode[supernode.index("--port") + 1])


@pytest.mark.parametrize("executor", ["resident", "per-message"])
def test_a_second_local_user_cannot_claim_a_task_or_change_the_context(
    tmp_path: Path, tiny_model: Path, executor: str
) -> None:
    silos = []
    for i, (name, rank) in enumerate({"hospital-a": 2, "hospital-b": 4}.items()):
        data = tmp_path / f"{name}.jsonl"
        write_silo_data(data, seed=i)
        silos.append(SiloSpec(name, data, {"columns": "input=text,output=label", "lora-rank": rank}))
    prefix, other_uid = _intruder_prefix()
    with LocalFederation(tmp_path / "ws", silos, executor=executor) as fed:
        state = fed.ws / "silos" / "hospital-a" / "state"
        secret_path = state / SECRET_FILE
        st = secret_path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        secret = secret_path.read_bytes()
        assert len(secret) >= 32
        address = f"127.0.0.1:{_runtime_port(fed, 0)}"
        intruder = subprocess.Popen(
            [*prefix, str(INTRUDER), address, "900", str(secret_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip
        try:
            values = run_config(
                tiny_model, "intruded", **{"strategy.min-nodes": 2, "strategy.name": "fedavg"}
            )
            result = fed.submit(values, timeout=900)
        finally:
            if intruder.poll() is None:
                intruder.send_signal(signal.SIGTERM)
            out, err = intruder.communicate(timeout=60)
        silo_logs = [p for p in (fed.ws / "logs").glob("silo-*.log")]
        files = [*silo_logs, *(fed.ws / "logs").glob("*"), *(fed.ws / "silos").rglob("*.jsonl")]
        audit = list(read_events(state / "audit.jsonl")) if (state / "audit.jsonl").exists() else []

    # The honest executor served every round; the run completed.
    assert [r["answered"] for r in result.rounds] == [2, 2], result.rounds
    # The intruder reached the Runtime API and was refused everything, every time.
    tally = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert tally is not None, f"the intruder printed nothing: {err[-2000:]}"
    for action in ("acquire_task", "acquire_task_forged", "pull_task_input", "push_task_output"):
        assert tally[action]["through"] == 0, tally
        assert tally[action]["refused"] >= 3, tally
        assert any("401" in d for d in tally[action]["details"]), tally
    if other_uid:
        assert tally["read_secret"]["through"] == 0 and tally["read_secret"]["refused"] >= 3, tally
    # Nobody pushed a context, so the ClientApp never had to overrule one.
    assert not [e for e in audit if e.get("kind") == "context_ignored"], audit
    # The secret's bytes are in no log, event or audit entry, and on no command line.
    for path in files:
        if path.is_file():
            assert secret not in path.read_bytes(), f"the Runtime API secret leaked into {path}"
    assert secret.decode() not in json.dumps([list(p.popen.args) for p in fed.group.processes])
