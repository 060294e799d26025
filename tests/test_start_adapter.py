"""A run may start from a published adapter, but only one every silo pinned itself (peft.start-adapter).

The silo side is SiloTune's real ClientApp on a tiny model (tests/support/clientapp_silo.py); the
central side is the real round loop on the scripted grid. Why the feature exists: DP silos start from
an adapter trained on public data (docs/privacy.md); why it is pinned: issue 23, no one picks the start
for the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from command_line.main import main
from silo_node.app.audit import read_audit
from silo_node.app.policy import PolicyError, SiloPolicy, check_run, load_policy
from silo_node.app.start_adapter import start_state
from silotune import protocol as p
from silotune.adapters import save_adapter_dir, state_digest, to_array_record
from silotune.config import ConfigError, parse_run_config
from silotune.errors import PolicyRefused
from silotune.silo_failures import SiloFailure
from tests.support.clientapp_silo import ClientAppSilo
from tests.support.scripted_grid import INIT, FakeGrid, FakeSilo, events_of, make_federation

pytestmark = pytest.mark.usefixtures("flower_task_identity")

PUBLIC = {k: v + 0.25 for k, v in INIT.items()}  # "trained on public data": not the seeded start
DIGEST = state_digest(PUBLIC)


def _policy(entries: list[tuple[str, Path]]) -> SiloPolicy:
    return SiloPolicy.model_validate({"start-adapters": [{"sha256": d, "path": str(p)} for d, p in entries]})


def _saved(directory: Path, state: dict[str, np.ndarray]) -> Path:
    save_adapter_dir(directory, state, {"peft_type": "LORA", "r": 2})
    return directory


# -- the run config and the policy ------------------------------------------------------------------
def test_the_run_names_a_start_only_by_a_digest_and_the_policy_pins_it(tmp_path: Path) -> None:
    assert parse_run_config({}).peft.start_adapter == ""
    assert parse_run_config({"peft.start-adapter": DIGEST.upper()}).peft.start_adapter == DIGEST
    with pytest.raises(ConfigError, match="peft.start-adapter"):
        parse_run_config({"peft.start-adapter": "/srv/adapters/evil"})  # a path is not a digest
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'[[start-adapters]]\nsha256 = "{DIGEST}"\npath = "{tmp_path}"\n')
    policy = load_policy(policy_file)
    check_run(policy, parse_run_config({"peft.start-adapter": DIGEST}))
    with pytest.raises(PolicyRefused, match="lists no such start adapter"):
        check_run(policy, parse_run_config({"peft.start-adapter": "0" * 64}))
    with pytest.raises(PolicyRefused, match="lists no such start adapter"):
        check_run(load_policy(None), parse_run_config({"peft.start-adapter": DIGEST}))  # the default
    policy_file.write_text('[[start-adapters]]\nsha256 = "abc"\npath = "/x"\n')
    with pytest.raises(PolicyError, match="start-adapters"):
        load_policy(policy_file)


def test_a_silo_loads_its_pinned_start_and_verifies_it_itself(tmp_path: Path) -> None:
    seeded = {k: v.copy() for k, v in INIT.items()}
    run = parse_run_config({"peft.rank": 2, "peft.start-adapter": DIGEST})
    policy = _policy([(DIGEST, _saved(tmp_path / "public", PUBLIC))])
    got = start_state(policy, run, 2, seeded)
    assert state_digest(got) == DIGEST
    assert start_state(policy, parse_run_config({"peft.rank": 2}), 2, seeded) is seeded  # no start named
    assert start_state(policy, run, 4, seeded) is seeded  # a FlexLoRA silo at another rank
    # The files changed after the operator pinned them: refused, whatever they now hold.
    _saved(tmp_path / "public", {k: v * 3 for k, v in PUBLIC.items()})
    with pytest.raises(PolicyRefused, match="files changed after they were pinned"):
        start_state(policy, run, 2, seeded)
    # Pinned, but another adapter's shapes: refused by name.
    wrong = {"m.lora_A.weight": np.ones((2, 5), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}
    policy = _policy([(state_digest(wrong), _saved(tmp_path / "wrong", wrong))])
    run = parse_run_config({"peft.rank": 2, "peft.start-adapter": state_digest(wrong)})
    with pytest.raises(PolicyRefused, match="m.lora_A.weight has shape"):
        start_state(policy, run, 2, seeded)
    # Pinned, but nothing there.
    policy = _policy([(DIGEST, tmp_path / "gone")])
    run = parse_run_config({"peft.rank": 2, "peft.start-adapter": DIGEST})
    with pytest.raises(PolicyRefused, match="cannot be read"):
        start_state(policy, run, 2, seeded)


def test_the_cli_prints_the_digest_and_the_policy_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directory = _saved(tmp_path / "public", PUBLIC)
    assert main(["silo", "start-adapter", str(directory)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == DIGEST
    assert f'sha256 = "{DIGEST}"' in out and f'path = "{directory}"' in out
    assert main(["silo", "start-adapter", str(tmp_path / "nothing")]) == 2
    assert "not a readable PEFT adapter directory" in capsys.readouterr().err


# -- the central site ---------------------------------------------------------------------------------
class PublicStart(FakeSilo):
    """Holds the run's named start adapter (its policy pins it) and sends it when asked."""

    def reply(self, msg: Message) -> RecordDict:
        content = super().reply(msg)
        if msg.metadata.message_type == "query" and msg.content["config"]["want-init"]:
            content["arrays"] = to_array_record(PUBLIC)
        return content


def test_a_named_start_takes_no_vote_and_a_silo_sending_another_is_recorded(tmp_path: Path) -> None:
    # Two silos send the seeded adapter, one the named start: the named one is the run's start.
    silos = {1: FakeSilo("seeded-a"), 2: FakeSilo("seeded-b"), 3: PublicStart("public")}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1, "peft.start-adapter": DIGEST})
    fed.run()
    assert events_of(tmp_path, "run_start")[0]["initial_sha256"] == DIGEST
    for key, start in PUBLIC.items():
        np.testing.assert_allclose(fed.global_state[key], start + 1.0, rtol=1e-6)
    rejected = {(e["node_id"], e["code"]) for e in events_of(tmp_path, "update_rejected")}
    assert rejected == {(1, p.R_INIT_MISMATCH), (2, p.R_INIT_MISMATCH)}


def test_no_silo_holding_the_named_start_stops_the_run_before_round_1(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1, "peft.start-adapter": DIGEST})
    with pytest.raises(RuntimeError, match="no silo provided the run's start adapter"):
        fed.run()
    assert events_of(tmp_path, "round_start") == []


# -- real silos -------------------------------------------------------------------------------------
@pytest.mark.slow  # real training of a tiny model at four silos
def test_silos_start_from_the_pinned_adapter_and_one_that_cannot_is_left_out(
    tmp_path: Path, tiny_model: Path
) -> None:
    from silo_node.app import resident
    from silotune.adapters import peft_config_dict
    from silotune.config import ModelConfig, PeftSettings

    run: dict[str, Any] = {"model.name": str(tiny_model), "num-rounds": 2, "peft.rank": 4,
                           "train.batch-size": 4, "train.local-steps": 1, "train.seq-length": 48,
                           "strategy.min-nodes": 2, "strategy.round-timeout": 600.0}  # fmt: skip
    # The published adapter: the tiny model's adapter with every value moved (as training would).
    slot = resident.model_with_adapter(ModelConfig(name=str(tiny_model)), PeftSettings(rank=4), 4, 0)
    rng = np.random.default_rng(3)
    public = {k: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) for k, v in slot.init_state.items()}
    source = tmp_path / "published"
    save_adapter_dir(source, public, peft_config_dict(slot.peft_model))
    digest = state_digest(public)
    run["peft.start-adapter"] = digest
    pinned = f'allow-local-paths = true\n[[start-adapters]]\nsha256 = "{digest}"\npath = "{source}"\n'
    tampered = tmp_path / "published-then-changed"
    save_adapter_dir(tampered, {k: v * 2 for k, v in public.items()}, peft_config_dict(slot.peft_model))
    changed = pinned.replace(str(source), str(tampered))
    silos = {
        1: ClientAppSilo(tmp_path, "bank-a", run, pinned),
        2: ClientAppSilo(tmp_path, "bank-b", run, pinned),
        3: ClientAppSilo(tmp_path, "tampered", run, changed, strict=False),
        4: ClientAppSilo(tmp_path, "unlisted", run, "allow-local-paths = true\n", strict=False),
    }
    server_cfg = {k: v for k, v in run.items() if k != "model.name"}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"model.name": str(tiny_model), **server_cfg})
    fed.run()
    assert events_of(tmp_path, "run_start")[0]["initial_sha256"] == digest  # the pinned files' digest
    assert events_of(tmp_path, "run_end")[-1]["status"] == "completed"
    # Round 1 trains from the start: only the silos that verified it. Later rounds train from the
    # global adapter, which a silo whose own copy of the start changed can take like any other.
    assert [e["answered"] for e in events_of(tmp_path, "round_end")] == [2, 3]
    trained = [(e["round"], e["silo"]) for e in events_of(tmp_path, "silo_result")]
    assert sorted(trained) == [(1, "bank-a"), (1, "bank-b"), (2, "bank-a"), (2, "bank-b"), (2, "tampered")]
    # Each refusing silo's operator sees why, in its own audit log; the central site only the code.
    [why_tampered] = {e["reason"] for e in read_audit(silos[3].state_dir) if e["kind"] == "refused"}
    assert "files changed after they were pinned" in why_tampered
    unlisted = {e["reason"] for e in read_audit(silos[4].state_dir) if e["kind"] == "refused"}
    assert unlisted and all("lists no such start adapter" in r for r in unlisted)
    failed = [(e["round"], e["code"]) for e in events_of(tmp_path, "silo_failed") if e["node_id"] == 3]
    assert failed == [(1, SiloFailure.POLICY_REFUSED.name)]
