"""The silo's local Runtime API secret and its launch settings (silo_node/app/runtime_auth.py; issue 23).

Fast checks: the secret file is 0600, made once and reused, refused when others could read it, and
never printed, logged, put on a command line or in the environment; both executors and the
SuperNode get its path; and the ClientApp's policy gate takes the policy file, data path and state
dir from its launch settings, never from the task's context. The real-process test (a second local
user trying to claim a task) is tests/test_runtime_auth_e2e.py.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from silo_node.app import client_app, runtime_auth
from silo_node.app.audit import read_audit
from silo_node.app.runtime_auth import SECRET_FILE, SETTINGS_ENV, ensure_secret, load_secret
from silotune.errors import PolicyRefused, UserError

RUN_ID = 5151


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    runtime_auth._NOTED.clear()
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


# -- the secret ---------------------------------------------------------------------------------
def test_the_secret_is_0600_made_once_and_reused(tmp_path: Path) -> None:
    path = ensure_secret(tmp_path / "state")
    assert path == tmp_path / "state" / SECRET_FILE
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700  # a new state dir is private
    secret = load_secret(path)
    assert len(secret) >= 32
    assert ensure_secret(tmp_path / "state") == path and path.read_bytes() == secret  # not remade
    assert [p.name for p in (tmp_path / "state").iterdir()] == [SECRET_FILE]  # no temporary left
    assert ensure_secret(tmp_path / "other").read_bytes() != secret  # random per silo


def test_a_secret_others_could_read_or_replace_is_refused(tmp_path: Path) -> None:
    path = ensure_secret(tmp_path)
    path.chmod(0o644)
    with pytest.raises(UserError, match="readable or writable by other users.*0644"):
        ensure_secret(tmp_path)
    with pytest.raises(UserError, match="other users"):
        load_secret(path)
    path.unlink()
    (tmp_path / "elsewhere").write_text("x")
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="not a regular file"):
        ensure_secret(tmp_path)
    path.unlink()
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    with pytest.raises(UserError, match="empty"):
        ensure_secret(tmp_path)


def _started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, executor: str) -> dict[str, Any]:
    """What start_silo would start (argv, env), without starting it."""
    from silo_node.ops import launch

    seen: dict[str, Any] = {}

    def fake_start(label: str, argv: list[str], log_path: Path | None, env: dict, netns: Any = None) -> str:
        seen.update(argv=argv, env=env)
        return "started"

    monkeypatch.setattr(launch, "start_process", fake_start)
    data = tmp_path / "silo.jsonl"
    data.write_text('{"text": "a", "label": "b"}\n')
    opts = launch.SiloOptions(
        superlink="127.0.0.1:1", insecure=True, executor=executor, runtime_port=9555,
        node_config={"data-path": str(data), "name": "hospital-a", "state-dir": str(tmp_path / "state")},
    )  # fmt: skip
    assert launch.start_silo(opts, None, check=False, preflight=False) == "started"
    return seen


@pytest.mark.parametrize("executor", ["resident", "per-message"])
def test_silo_start_gives_the_secrets_path_to_the_supernode_and_the_executor_never_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    executor: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen = _started(monkeypatch, tmp_path, executor)
    path = tmp_path / "state" / SECRET_FILE
    secret = path.read_bytes().decode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    argv = seen["argv"]
    supernode = json.loads(argv[argv.index("--supernode") + 1])
    worker = json.loads(argv[argv.index("--worker") + 1])
    for cmd in (supernode, worker):
        assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(path)
    # Flower honours the secret only with --isolation process: both executors run that way.
    assert supernode[supernode.index("--isolation") + 1] == "process"
    if executor == "per-message":
        assert Path(worker[0]).name == "flower-superexec"
        assert worker[worker.index("--runtime-api-address") + 1] == "127.0.0.1:9555"
    else:
        assert worker[1:3] == ["-m", "silo_node.ops.worker"]
    # The ClientApp's settings travel in the environment the silo's processes start with.
    settings = json.loads(seen["env"][SETTINGS_ENV])
    assert settings["state-dir"] == str((tmp_path / "state").resolve()) and settings["name"] == "hospital-a"
    # Never the bytes: not on a command line, in the environment, on the terminal or in a log.
    out = capsys.readouterr()
    assert secret not in json.dumps(argv) and secret not in json.dumps(seen["env"])
    assert secret not in out.out + out.err and secret not in caplog.text
    # A second start reuses the same secret.
    _started(monkeypatch, tmp_path, executor)
    assert path.read_text() == secret


def test_the_worker_signs_acquire_task_with_the_secret(tmp_path: Path) -> None:
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    from silo_node.ops.worker import Worker

    signed = Worker("127.0.0.1:1", secret=load_secret(ensure_secret(tmp_path)))._client(None)
    plain = Worker("127.0.0.1:1")._client(None)
    try:
        assert any(isinstance(i, SuperExecAuthHttpInterceptor) for i in signed._interceptors)
        assert not any(isinstance(i, SuperExecAuthHttpInterceptor) for i in plain._interceptors)
    finally:
        signed.close()
        plain.close()


# -- launch settings over the task's context -----------------------------------------------------
def _message() -> Message:
    msg = Message(
        content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.QUERY,
    )
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


def _silo(tmp_path: Path, name: str, policy: str) -> dict[str, str]:
    d = tmp_path / name
    d.mkdir()
    (d / "data.jsonl").write_text('{"text": "a", "label": "b"}\n')
    (d / "policy.toml").write_text(policy)
    return {
        "data-path": str(d / "data.jsonl"),
        "name": "hospital-a",
        "policy-file": str(d / "policy.toml"),
        "state-dir": str(d / "state"),
    }


def test_the_policy_gate_takes_policy_data_and_state_from_launch_settings_not_the_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The silo's own launch: a policy that refuses remote code. The context, as someone else on
    # the host could push it back: a permissive policy, another data file, another state dir.
    launch = _silo(tmp_path, "launch", "allow-trust-remote-code = false\nallow-local-paths = true\n")
    pushed = _silo(tmp_path, "pushed", "allow-trust-remote-code = true\nallow-local-paths = true\n")
    monkeypatch.setenv(SETTINGS_ENV, json.dumps(launch))
    hostile = {"model.name": str(tmp_path), "model.trust-remote-code": True}
    with pytest.raises(PolicyRefused, match="trust-remote-code"):
        client_app.policy_gate(_message(), Context(RUN_ID, 7, pushed, RecordDict(), hostile), "handshake")
    audit = list(read_audit(Path(launch["state-dir"])))
    ignored = [e for e in audit if e["kind"] == "context_ignored"]
    assert len(ignored) == 1 and ignored[0]["run_id"] == str(RUN_ID)
    assert ignored[0]["keys"] == ["data-path", "policy-file", "state-dir"]
    assert [e for e in audit if e["kind"] == "refused"]
    assert not Path(pushed["state-dir"]).exists()  # nothing written where the context pointed

    # A run the silo's policy allows is served with the silo's own data path and state dir.
    fine = {"model.name": str(tmp_path)}
    _, silo = client_app.policy_gate(_message(), Context(RUN_ID, 7, pushed, RecordDict(), fine), "handshake")
    assert (silo.data_path, silo.state_dir, silo.policy_file) == (
        launch["data-path"], launch["state-dir"], launch["policy-file"],
    )  # fmt: skip
    # The same disagreement is audited once per run, not per message.
    assert len([e for e in read_audit(Path(launch["state-dir"])) if e["kind"] == "context_ignored"]) == 1
    assert not Path(pushed["state-dir"]).exists()


def test_a_context_that_agrees_is_not_noted_and_bad_launch_settings_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launch = _silo(tmp_path, "launch", "allow-local-paths = true\n")
    monkeypatch.setenv(SETTINGS_ENV, json.dumps(launch))
    ctx = Context(RUN_ID, 7, dict(launch), RecordDict(), {"model.name": str(tmp_path)})
    client_app.policy_gate(_message(), ctx, "handshake")
    assert not [e for e in read_audit(Path(launch["state-dir"])) if e["kind"] == "context_ignored"]
    # Launch settings that cannot be read refuse: the context is no fallback for a silo that has them.
    monkeypatch.setenv(SETTINGS_ENV, "not json")
    with pytest.raises(PolicyRefused, match=SETTINGS_ENV):
        runtime_auth.silo_settings(ctx)


def test_without_launch_settings_the_context_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process callers (these tests, Flower's simulation) have no launch settings.
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    cfg = _silo(tmp_path, "ctx", "")
    silo = runtime_auth.silo_settings(Context(RUN_ID, 7, cfg, RecordDict(), {}))
    assert silo.data_path == cfg["data-path"] and silo.state_dir == cfg["state-dir"]
