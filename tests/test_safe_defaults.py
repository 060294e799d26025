"""Under the shipped defaults, no single silo steers a run or picks its starting point (issue 23, 1-2).

Driven through the real round loop (superlink/app/rounds.py) on the scripted grid: honest silos add 1 to
every tensor they receive; the hostile one lies in the way the test names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from silotune import protocol as p
from silotune.adapters import state_digest, to_array_record
from silotune.config import StrategySettings, parse_run_config
from silotune.errors import InitRefused
from silotune.silo_failures import SiloFailure, classify
from tests.support.scripted_grid import INIT, FakeGrid, FakeSilo, events_of, make_federation

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class HostileStart(FakeSilo):
    """Trains like the others, but offers an initial adapter of the right shapes, every value x1000."""

    def reply(self, msg: Message) -> RecordDict:
        content = super().reply(msg)
        if msg.metadata.message_type == "query" and msg.content["config"]["want-init"]:
            content["arrays"] = to_array_record({k: v * 1000 for k, v in INIT.items()})
        return content


class RecordingSilo(FakeSilo):
    """Keeps the initial-adapter hash each train message carried."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.claims: list[str] = []

    def reply(self, msg: Message) -> RecordDict:
        if msg.metadata.message_type == "train":
            self.claims.append(str(msg.content["config"].get(p.INITIAL_SHA256, "")))
        return super().reply(msg)


def test_the_default_aggregator_is_robust() -> None:
    assert StrategySettings().aggregator == "consensus"
    assert parse_run_config({}).strategy.aggregator == "consensus"


def test_a_liar_declaring_1e9_examples_and_sending_minus_1000_moves_no_tensor_against_the_honest(
    tmp_path: Path,
) -> None:
    # Two honest silos add +1; the third declares 10^9 examples at its handshake and adds -1000.
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: FakeSilo("liar", n=10**9, delta=-1000.0)}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 2})
    fed.run()
    for key, start in INIT.items():
        moved = fed.global_state[key] - start
        assert (moved > 0).all(), key  # every value moved the honest way (was -0.5 under `mean`)
        np.testing.assert_allclose(moved, 2.0, rtol=1e-6)  # exactly the honest result
    used = {e["node_id"]: e["modules_used"] for e in events_of(tmp_path, "anomaly_score")}
    assert used[3] == 0.0 and used[1] == used[2] == 1.0


def test_with_two_silos_the_default_is_a_capped_clipped_mean(tmp_path: Path) -> None:
    """Two disagreeing silos cannot be told apart: the default averages both at equal caps (0.5)
    and clips each to 3x the smaller norm, so a liar's pull is bounded, not removed (docs/security.md)."""
    silos = {1: FakeSilo("a"), 2: FakeSilo("liar", n=10**9, delta=-1000.0)}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1})
    fed.run()
    shares = {e["node_id"]: e["weight_share"] for e in events_of(tmp_path, "anomaly_score")}
    assert shares == {1: 0.5, 2: 0.5}
    clipped = {e["node_id"]: e["clip_factor"] for e in events_of(tmp_path, "anomaly_score")}
    assert clipped[1] == 1.0 and clipped[2] < 0.01
    assert np.abs(fed.global_state["m.lora_A.weight"] - INIT["m.lora_A.weight"]).max() < 10


def test_a_hostile_initial_adapter_is_not_the_run_start_and_the_run_completes(tmp_path: Path) -> None:
    # The hostile silo has the lowest node id: the one that used to supply the start alone.
    silos = {1: HostileStart("evil"), 2: FakeSilo("a"), 3: FakeSilo("b")}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 2})
    fed.run()
    for key, start in INIT.items():  # the honest start plus two honest rounds (was 2002, not 3)
        np.testing.assert_allclose(fed.global_state[key], start + 2.0, rtol=1e-6)
    rejected = events_of(tmp_path, "update_rejected")
    assert [(e["node_id"], e["phase"], e["code"]) for e in rejected] == [(1, "init", p.R_INIT_MISMATCH)]
    assert events_of(tmp_path, "run_end")[0]["status"] == "completed"


def test_silos_are_told_the_agreed_start_only_while_the_adapter_is_still_it(tmp_path: Path) -> None:
    silos = {1: RecordingSilo("a"), 2: RecordingSilo("b"), 3: RecordingSilo("c")}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 2})
    fed.run()
    assert silos[1].claims == [state_digest(INIT), ""]


def test_two_silos_that_disagree_on_the_start_stop_the_run_before_round_1(tmp_path: Path) -> None:
    silos = {1: HostileStart("evil"), 2: FakeSilo("a")}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1})
    with pytest.raises(RuntimeError, match="initial adapters disagree.*evil.*a"):
        fed.run()
    assert fed.global_state == {}
    assert events_of(tmp_path, "round_start") == []


def test_a_silo_refuses_a_start_it_would_not_have_made() -> None:
    from silo_node.app.client_app import _check_start

    run = parse_run_config({"peft.rank": 2})
    mine = {k: v.copy() for k, v in INIT.items()}
    _check_start(ConfigRecord({p.INITIAL_SHA256: state_digest(INIT)}), run, 2, mine)  # agrees
    _check_start(ConfigRecord({}), run, 2, mine)  # not the run's start: nothing to compare
    hostile = state_digest({k: v * 1000 for k, v in INIT.items()})
    _check_start(ConfigRecord({p.INITIAL_SHA256: hostile}), run, 4, mine)  # another FlexLoRA rank
    with pytest.raises(InitRefused, match="derives") as err:
        _check_start(ConfigRecord({p.INITIAL_SHA256: hostile}), run, 2, mine)
    assert classify(err.value) == SiloFailure.INIT_REFUSED


def test_state_digest_ignores_key_order_and_sees_every_value() -> None:
    a = {"x": np.arange(4, dtype=np.float32), "y": np.ones((2, 2), np.float32)}
    b = {"y": a["y"].copy(), "x": a["x"].copy()}
    assert state_digest(a) == state_digest(b)
    b["x"][3] = np.nextafter(np.float32(3), np.float32(4))
    assert state_digest(a) != state_digest(b)
    assert state_digest({"x": np.zeros(4, np.float32)}) != state_digest({"x": np.zeros((2, 2), np.float32)})
