"""Silo policy, audit log and approvals (issue 12, items 3-5), without processes.

The ClientApp handlers are called with real Flower Messages and Contexts; the central side runs on
the scripted Grid of tests/test_rounds.py. Real federations: tests/test_silo_policy_e2e.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from silo_node.app import client_app
from silo_node.app.audit import approve_run, arrays_sha256, read_audit
from silo_node.app.policy import PolicyError, SiloPolicy, check_federation, check_run, load_policy
from silotune.adapters import to_array_record
from silotune.admission_ledger import admitted_names
from silotune.config import parse_run_config
from silotune.errors import PolicyRefused, UserError
from silotune.events import read_events
from silotune.silo_failures import SiloFailure, describe_error, reason_for
from silotune.wire_codec import Encoding, encode
from superlink.app.rounds import Federation
from tests.support.scripted_grid import FakeGrid, FakeSilo

RUN_ID = 4242


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    # Messages read the run id from Flower's process-wide task identity (set by flwr-serverapp).
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


# -- the policy file ------------------------------------------------------------------------------
def test_defaults_allow_embedded_models_only_no_local_path_hub_id_or_remote_code(tmp_path: Path) -> None:
    policy = load_policy(None)
    check_run(policy, parse_run_config({}))  # the embedded demo model
    assert policy.allow_local_paths is False
    for local in (str(tmp_path), "./models/x", "/etc"):  # any directory the silo can read: off
        with pytest.raises(PolicyRefused, match="allow-local-paths=false"):
            check_run(policy, parse_run_config({"model.name": local}))
    # ... unless the policy allows local paths, or lists that one directory.
    check_run(SiloPolicy(allow_local_paths=True), parse_run_config({"model.name": str(tmp_path)}))
    listed = SiloPolicy.model_validate({"models": [{"name": str(tmp_path)}]})
    check_run(listed, parse_run_config({"model.name": str(tmp_path)}))
    with pytest.raises(PolicyRefused, match="allow-local-paths"):
        check_run(listed, parse_run_config({"model.name": str(tmp_path / "other")}))
    with pytest.raises(PolicyRefused, match="not in this silo's policy"):
        check_run(policy, parse_run_config({"model.name": "evil-org/backdoored-model"}))
    with pytest.raises(PolicyRefused, match="trust-remote-code"):
        check_run(policy, parse_run_config({"model.name": str(tmp_path), "model.trust-remote-code": True}))
    for key, value, limit in (
        ("num-rounds", 5000, "max-rounds=1000"),
        ("train.local-steps", 5000, "max-local-steps=1000"),
        ("train.seq-length", 8192, "max-seq-length=4096"),
        ("train.batch-size", 100000, "max-batch-size=64"),
        ("train.grad-accum", 100000, "max-grad-accum=64"),
    ):
        with pytest.raises(PolicyRefused, match=limit):
            check_run(policy, parse_run_config({key: value}))


def test_policy_file_lists_hub_models_and_sets_limits(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        "allow-local-paths = false\nallow-trust-remote-code = true\nmax-local-steps = 3\n"
        '[[models]]\nname = "org/model"\nsha256 = "' + "ab" * 32 + '"\n'
    )
    policy = load_policy(path)
    check_run(policy, parse_run_config({"model.name": "org/model", "model.trust-remote-code": True,
                                      "train.local-steps": 3}))  # fmt: skip
    with pytest.raises(PolicyRefused, match="allow-local-paths"):
        check_run(policy, parse_run_config({"model.name": str(tmp_path), "train.local-steps": 1}))
    with pytest.raises(PolicyRefused, match="max-local-steps=3"):
        check_run(policy, parse_run_config({"model.name": "org/model", "train.local-steps": 4}))


def test_the_policy_owns_every_compute_knob_and_the_adapted_modules(tmp_path: Path) -> None:
    from silo_node.app.policy import check_silo_rank

    path = tmp_path / "policy.toml"
    path.write_text('max-batch-size = 8\nmax-rank = 16\nallowed-target-modules = ["q_proj", "v_proj"]\n')
    policy = load_policy(path)
    check_run(
        policy, parse_run_config({"train.batch-size": 8, "peft.rank": 16, "peft.target-modules": "v_proj"})
    )
    for flat, match in (
        ({"train.batch-size": 9}, "max-batch-size=8"),
        ({"peft.rank": 32}, "max-rank=16"),
        ({"peft.target-modules": "q_proj,v_proj,down_proj"}, "not down_proj"),
        ({"peft.target-modules": "all-linear"}, "not all-linear"),
    ):
        with pytest.raises(PolicyRefused, match=match):
            check_run(policy, parse_run_config(flat))
    with pytest.raises(PolicyRefused, match="rank 32 exceeds"):
        check_silo_rank(policy, 32)  # FlexLoRA: the silo's own node-config rank
    check_run(load_policy(None), parse_run_config({"peft.target-modules": "all-linear"}))  # default: any


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max-rounds = 0\n", "max-rounds"),
        ("alow-embedded = true\n", "alow-embedded: unknown key"),
        ("[[models]]\nname = 'x'\nsha256 = 'nothex'\n", "models.0.sha256"),
        ("federation-ca-sha256 = 'abc'\n", "federation-ca-sha256"),
        ("max-rounds = \n", "not valid TOML"),
    ],
)
def test_a_bad_policy_file_names_the_file_and_the_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=match) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")


def test_silo_start_refuses_a_federation_other_than_the_policys(tmp_path: Path) -> None:
    from certs.pki import create_ca
    from silo_node.app.policy import ca_fingerprint

    create_ca(tmp_path / "ours")
    create_ca(tmp_path / "theirs")
    ours = ca_fingerprint(tmp_path / "ours" / "ca.crt")
    policy = load_policy(_write(tmp_path / "p.toml", f'federation-ca-sha256 = "{ours}"\n'))
    check_federation(policy, tmp_path / "ours" / "ca.crt")
    # The colon form `silotune certs show` prints is accepted too.
    colons = ":".join(ours[i : i + 2] for i in range(0, 64, 2))
    check_federation(load_policy(_write(tmp_path / "q.toml", f'federation-ca-sha256 = "{colons}"\n')),
                     tmp_path / "ours" / "ca.crt")  # fmt: skip
    with pytest.raises(UserError, match="refusing to start"):
        check_federation(policy, tmp_path / "theirs" / "ca.crt")
    with pytest.raises(UserError, match="without --ca"):
        check_federation(policy, None)


def test_start_silo_checks_the_policy_before_anything_starts(tmp_path: Path) -> None:
    from silo_node.ops.launch import SiloOptions, start_silo

    data = _data(tmp_path)
    bad = _write(tmp_path / "bad.toml", "max-steps = 3\n")
    opts = SiloOptions(superlink="127.0.0.1:1", node_config={"data-path": str(data), "policy-file": str(bad)},
                       insecure=True)  # fmt: skip
    with pytest.raises(UserError, match="max-steps: unknown key"):
        start_silo(opts, None, check=False, preflight=False)


@pytest.mark.parametrize("policy", ["require-approval = true\n", f"allowed-apps = ['{'ab' * 32}']\n"])
def test_per_message_executor_refuses_a_policy_it_cannot_enforce(tmp_path: Path, policy: str) -> None:
    from silo_node.ops.launch import SiloOptions, start_silo

    path = _write(tmp_path / "policy.toml", policy)
    opts = SiloOptions(superlink="127.0.0.1:1", node_config={"data-path": str(_data(tmp_path)),
                       "policy-file": str(path)}, insecure=True, executor="per-message")  # fmt: skip
    with pytest.raises(UserError, match="per-message runs any app.*resident executor"):
        start_silo(opts, None, check=False, preflight=False)


def test_per_message_executor_says_loudly_what_it_gives_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from silo_node.ops.launch import SiloOptions, check_policy
    from silotune.config import parse_silo_config

    silo = parse_silo_config({"data-path": str(_data(tmp_path)), "name": "hospital-a"})
    check_policy(silo, SiloOptions(superlink="127.0.0.1:1", insecure=True, executor="per-message"))
    err = capsys.readouterr().err
    assert "WARNING: silo hospital-a: --executor per-message gives up app pinning" in err
    assert "resident executor" in err
    check_policy(silo, SiloOptions(superlink="127.0.0.1:1", insecure=True))  # resident: nothing to say
    assert capsys.readouterr().err == ""


# -- the ClientApp ------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "silo.jsonl"
    rows = [{"text": f"Company {i} shares rose", "label": "positive"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _context(tmp_path: Path, run_config: dict, policy: Path | None = None) -> Context:
    node_config = {
        "data-path": str(_data(tmp_path)),
        "name": "hospital-a",
        "columns": "input=text,output=label",
        "state-dir": str(tmp_path / "state"),
    }
    if policy is not None:
        node_config["policy-file"] = str(policy)
    return Context(RUN_ID, 7, node_config, RecordDict(), run_config)


def _message(kind: str, server_round: int = 1, arrays: dict | None = None) -> Message:
    config = ConfigRecord({"want-init": False, "server-round": server_round, "lr": 1e-3})
    content = RecordDict({"config": config})
    if arrays is not None:
        content["arrays"] = to_array_record(encode(arrays, Encoding()))  # fp32, packed: the default
    msg = Message(content=content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before any model file is read, let alone loaded."""

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a model was touched before the policy check")

    from silo_node.app import resident
    from silotune import modeling

    monkeypatch.setattr(resident, "model_with_adapter", boom)
    monkeypatch.setattr(modeling, "load_model", boom)
    monkeypatch.setattr(client_app, "model_identity", boom)


@pytest.mark.parametrize(
    ("run_config", "detail"),
    [
        ({"model.name": "evil-org/backdoored-model"}, "not in this silo's policy"),
        ({"model.name": "/opt/models/x", "model.trust-remote-code": True}, "trust-remote-code"),
        ({"train.local-steps": 100000}, "max-local-steps"),
    ],
)
@pytest.mark.parametrize(("handler", "kind"), [("handshake", MessageType.QUERY), ("train", MessageType.TRAIN),
                                              ("evaluate", MessageType.EVALUATE)])  # fmt: skip
def test_clientapp_refuses_a_run_outside_its_policy_with_a_code_only(
    tmp_path: Path, no_model_loads: None, run_config: dict, detail: str, handler: str, kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    msg = _message(kind, arrays={"a": np.zeros((2, 2), np.float32)})
    reply = getattr(client_app, handler)(msg, _context(tmp_path, run_config))
    assert reply.has_error()
    assert reply.error.code == SiloFailure.POLICY_REFUSED
    assert reply.error.reason == reason_for(SiloFailure.POLICY_REFUSED)  # the fixed text, nothing else
    assert "backdoored" not in reply.error.reason and "local-steps" not in reply.error.reason
    # The central site records only the code and its fixed text, whatever the silo sent.
    assert describe_error(reply.error.code, "anything at all").startswith("POLICY_REFUSED: ")
    # The silo's own operator sees the full reason: in its audit log (and its log).
    refused = [e for e in read_audit(tmp_path / "state") if e["kind"] == "refused"]
    assert len(refused) == 1 and detail in refused[0]["reason"]
    assert refused[0]["run_id"] == str(RUN_ID) and refused[0]["phase"] == handler


def test_a_broken_policy_file_refuses_every_run(tmp_path: Path, no_model_loads: None) -> None:
    policy = _write(tmp_path / "p.toml", "max-rounds = -1\n")
    reply = client_app.handshake(_message(MessageType.QUERY), _context(tmp_path, {}, policy))
    assert reply.error.code == SiloFailure.POLICY_REFUSED
    [entry] = [e for e in read_audit(tmp_path / "state") if e["kind"] == "refused"]
    assert str(policy) in entry["reason"] and "max-rounds" in entry["reason"]


def test_approval_holds_a_run_until_the_operator_approves_then_times_out_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from command_line.main import main
    from tests.support.tiny_model import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny")
    policy = _write(
        tmp_path / "p.toml", "require-approval = true\napproval-timeout-hours = 1\nallow-local-paths = true\n"
    )
    ctx = _context(tmp_path, {"model.name": str(model)}, policy)
    for _ in range(2):  # asked again and again: still pending, recorded once
        reply = client_app.handshake(_message(MessageType.QUERY), ctx)
        assert reply.error.code == SiloFailure.APPROVAL_PENDING
        assert reply.error.reason == reason_for(SiloFailure.APPROVAL_PENDING)
    state = tmp_path / "state"
    assert [e["kind"] for e in read_audit(state)] == ["pending"]
    assert main(["silo", "approve", str(RUN_ID), "--state-dir", str(state), "--note", "ok by DPO"]) == 0
    reply = client_app.handshake(_message(MessageType.QUERY), ctx)
    assert not reply.has_error()
    assert reply.content["metrics"]["num-examples"] > 0
    kinds = [e["kind"] for e in read_audit(state)]
    assert kinds == ["pending", "approved", "run"]
    run = list(read_audit(state))[-1]
    assert run["run_id"] == str(RUN_ID) and len(run["run_config_sha256"]) == 64
    assert run["app_module_sha256"] and run["silotune_version"]

    # Another run, never approved: refused once the policy's timeout has passed.
    other = Context(RUN_ID + 1, 7, dict(ctx.node_config), RecordDict(), dict(ctx.run_config))
    assert client_app.handshake(_message(MessageType.QUERY), other).error.code == SiloFailure.APPROVAL_PENDING
    real = time.time
    monkeypatch.setattr(client_app.time, "time", lambda: real() + 3601)
    reply = client_app.handshake(_message(MessageType.QUERY), other)
    assert reply.error.code == SiloFailure.POLICY_REFUSED
    last = list(read_audit(state))[-1]
    assert last["kind"] == "refused" and "approval-timeout-hours=1" in last["reason"]


def test_audit_cli_prints_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from command_line.main import main

    approve_run(tmp_path, 17, "fine")
    assert main(["silo", "audit", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "approved" in out and "run_id=17" in out and "note=fine" in out
    assert main(["silo", "audit", "--state-dir", str(tmp_path / "nothing")]) == 2
    with pytest.raises(UserError, match="numeric run id"):
        approve_run(tmp_path, "../../etc/passwd")


def test_arrays_hash_is_stable_and_sensitive() -> None:
    a = to_array_record({"x": np.ones((2, 3), np.float32)})
    b = to_array_record({"x": np.ones((2, 3), np.float32)})
    c = to_array_record({"x": np.full((2, 3), 2.0, np.float32)})
    assert arrays_sha256(a) == arrays_sha256(b) != arrays_sha256(c)


# -- the central site ---------------------------------------------------------------------------------
class ApprovalGrid(FakeGrid):
    """``holding`` nodes answer every message with APPROVAL_PENDING until released."""

    def __init__(self, silos: dict[int, FakeSilo], holding: set[int]) -> None:
        super().__init__(silos)
        self.holding = holding
        self.asked: list[int] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, m in enumerate(messages):
            nid = m.metadata.dst_node_id
            self.asked.append(nid)
            if nid not in self.holding:
                ids += list(super().push_messages([m]))
                continue
            mid = f"{len(self.outbox)}-p{i}"
            m.metadata.__dict__["_message_id"] = mid
            code = SiloFailure.APPROVAL_PENDING
            reply = Message(Error(code=int(code), reason="hospital-c's secret reason"), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = nid
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.outbox[mid] = reply
            ids.append(mid)
        return ids


def _federation(tmp_path: Path, grid: FakeGrid, **cfg: object) -> Federation:
    base = {"num-rounds": 3, "strategy.min-nodes": 2, "strategy.round-timeout": 5.0,
            "strategy.wait-for-nodes": 1.0, "peft.rank": 2}  # fmt: skip
    base.update(cfg)
    return Federation(grid, parse_run_config(base), tmp_path / "run", sleep=lambda s: None)


def _events(tmp_path: Path, kind: str) -> list[dict]:
    return [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == kind]


def test_a_pending_silo_is_not_failed_and_is_asked_every_round(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: FakeSilo("c")}
    grid = ApprovalGrid(silos, holding={3})
    fed = _federation(tmp_path, grid)
    original = fed.run_round

    def run_round(rnd: int):  # noqa: ANN202
        if rnd == 3:
            grid.holding.clear()  # the operator approved during round 2
        return original(rnd)

    fed.run_round = run_round  # type: ignore[method-assign]
    fed.run()
    pending = _events(tmp_path, "silo_pending")
    assert pending and {e["node_id"] for e in pending} == {3}
    assert all(e["code"] == "APPROVAL_PENDING" and "secret" not in e["reason"] for e in pending)
    assert not _events(tmp_path, "silo_failed")
    # Asked at the start and in rounds 1, 2 (no backoff); trained in round 3.
    assert {e["round"] for e in pending} == {0, 1, 2}
    assert [e["round"] for e in _events(tmp_path, "silo_result") if e["node_id"] == 3] == [3]


def test_a_run_waits_for_approval_when_too_few_silos_are_ready(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    grid = ApprovalGrid(silos, holding={2})
    clock = [0.0]

    def sleep(s: float) -> None:  # the operator approves after 20 s
        clock[0] += s
        if clock[0] >= 20:
            grid.holding.clear()

    cfg = parse_run_config({"num-rounds": 1, "strategy.min-nodes": 2, "peft.rank": 2,
                            "strategy.wait-for-nodes": 60.0})  # fmt: skip
    fed = Federation(grid, cfg, tmp_path / "run", sleep=sleep, clock=lambda: clock[0])
    fed.run()
    assert len(_events(tmp_path, "silo_pending")) >= 2
    assert {e["node_id"] for e in _events(tmp_path, "silo_result")} == {1, 2}


def test_central_records_use_admitted_names_never_claimed_ones(tmp_path: Path, monkeypatch) -> None:
    ledger = tmp_path / "admitted-silos.json"
    ledger.write_text(json.dumps({
        "hospital-a": {"name": "hospital-a", "node_id": "1", "fingerprint": "f", "public_key": "k",
                       "admitted_at": 0},
        "bank-b": {"name": "bank-b", "node_id": "2", "fingerprint": "f", "public_key": "k", "admitted_at": 0},
    }))  # fmt: skip
    monkeypatch.setenv("SILOTUNE_ADMISSIONS", f"{tmp_path / 'missing.json'}:{ledger}")
    assert admitted_names() == {1: "hospital-a", 2: "bank-b"}
    # bank-b and an unadmitted node both claim to be hospital-a.
    silos = {1: FakeSilo("hospital-a"), 2: FakeSilo("hospital-a"), 3: FakeSilo("hospital-a")}
    fed = _federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1, "strategy.min-nodes": 3})
    fed.run()
    names = {e["node_id"]: e["silo"] for e in _events(tmp_path, "silo_result")}
    assert names == {1: "hospital-a", 2: "bank-b", 3: "node-3"}
    hs = {e["node_id"]: e for e in _events(tmp_path, "silo_handshake")}
    assert "claimed_name" not in hs[1]
    assert hs[2]["claimed_name"] == "hospital-a" and hs[2]["silo"] == "bank-b"
    assert hs[3]["claimed_name"] == "hospital-a" and hs[3]["silo"] == "node-3"


def test_superlink_env_points_the_serverapp_at_the_admission_ledger(tmp_path: Path) -> None:
    from superlink.ops.launch import SuperLinkOptions, superlink_env

    env = superlink_env(SuperLinkOptions(flwr_home=tmp_path / "ws" / "superlink" / "flwr-home"), base={})
    paths = env["SILOTUNE_ADMISSIONS"].split(":")
    assert str(tmp_path / "ws" / "flwr-home" / "admitted-silos.json") in paths
    assert (
        superlink_env(SuperLinkOptions(flwr_home=tmp_path), base={"SILOTUNE_ADMISSIONS": "/x"})[
            "SILOTUNE_ADMISSIONS"
        ]
        == "/x"
    )
