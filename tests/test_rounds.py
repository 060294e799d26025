"""The round loop on a scripted Grid (no processes): sampling, refusals, validation, retries,
budget, resume. The real-process version is tests/test_federation_e2e.py."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from superlink.app.round_core import sample_nodes
from tests.support.scripted_grid import FakeGrid, FakeSilo
from tests.support.scripted_grid import events_of as _kinds
from tests.support.scripted_grid import make_federation as _fed

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_sampling_respects_fraction_and_min_nodes() -> None:
    nodes = list(range(20))
    assert len(sample_nodes(nodes, 0.1, 2, random.Random(0))) == 2
    assert len(sample_nodes(nodes, 0.5, 2, random.Random(0))) == 10
    assert len(sample_nodes(nodes[:3], 0.1, 5, random.Random(0))) == 3
    assert sample_nodes(nodes, 0.2, 1, random.Random(3)) == sample_nodes(nodes, 0.2, 1, random.Random(3))


def test_rounds_aggregate_and_checkpoint(tmp_path: Path) -> None:
    grid = FakeGrid({1: FakeSilo("a", n=10, delta=1.0), 2: FakeSilo("b", n=30, delta=3.0)})
    # No share cap here (default 0.5 would give two silos equal weights) and no clipping (b's update
    # is beyond 3x a's, the smaller norm): FedAvg by examples.
    fed = _fed(tmp_path, grid, **{"strategy.max-weight-share": 1.0, "strategy.clip-relative": 0.0})
    final = fed.run()
    assert final is not None and final.name == "round-0002"
    # Each round adds the example-weighted mean delta: (10*1 + 30*3) / 40 = 2.5.
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 1 + 2 * 2.5)
    ends = _kinds(tmp_path, "round_end")
    assert [e["answered"] for e in ends] == [2, 2]
    assert ends[-1]["cumulative_bytes"] == sum(e["uplink_bytes"] + e["downlink_bytes"] for e in ends)


def test_silo_on_another_base_model_is_refused(tmp_path: Path) -> None:
    grid = FakeGrid({1: FakeSilo("a"), 2: FakeSilo("b"), 3: FakeSilo("odd", sha="b" * 64)})
    fed = _fed(tmp_path, grid)
    fed.run()
    assert fed.silos[3].refused and "differs" in fed.silos[3].refused
    assert all(3 not in e["sampled"] for e in _kinds(tmp_path, "round_start"))
    assert any(e["node_id"] == 3 for e in _kinds(tmp_path, "update_rejected"))


def test_malformed_update_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a", delta=1.0), 2: FakeSilo("b", delta=5.0)}
    silos[2].bad_shape = True
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1})
    fed.run()
    rejected = _kinds(tmp_path, "update_rejected")
    assert rejected and "shape" in rejected[0]["reason"]
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 2.0)  # only silo a counted


def test_silent_silo_is_dropped_after_the_round_timeout(tmp_path: Path) -> None:
    grid = FakeGrid({1: FakeSilo("a"), 2: FakeSilo("b")})
    fed = _fed(tmp_path, grid, **{"num-rounds": 1, "strategy.round-timeout": 0.5})
    fed.registry.handshake([1, 2], server_round=0)
    fed.global_state = fed.registry.agree_initial_adapter().state
    grid.drop = lambda nid: nid == 2  # silo b goes silent after its handshake
    outcome = fed.run_round(1)
    assert outcome.answered == 1 and outcome.failed == 1
    assert "no reply within" in _kinds(tmp_path, "silo_failed")[0]["reason"]


def test_transient_superlink_errors_are_retried(tmp_path: Path) -> None:
    grid = FakeGrid({1: FakeSilo("a"), 2: FakeSilo("b")}, flaky_pulls=3)
    fed = _fed(tmp_path, grid, **{"num-rounds": 1})
    assert fed.run() is not None


def test_budget_stops_the_run(tmp_path: Path) -> None:
    grid = FakeGrid({1: FakeSilo("a"), 2: FakeSilo("b")})
    fed = _fed(tmp_path, grid, **{"num-rounds": 5, "comm-budget-mb": 0.0001})
    fed.run()
    end = _kinds(tmp_path, "run_end")[-1]
    assert end["status"] == "budget_exceeded" and end["rounds_completed"] == 1


def test_resume_continues_and_refuses_a_changed_method(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1}).run()
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 3})
    fed.run()
    assert [e["round"] for e in _kinds(tmp_path, "round_end")] == [1, 2, 3]
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 4.0)  # 1 + three rounds of +1
    changed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 4, "peft.method": "dora"})
    with pytest.raises(RuntimeError, match="peft.method was 'lora', now 'dora'"):
        changed.run()


def test_no_silo_at_all_fails_clearly(tmp_path: Path) -> None:
    fed = _fed(tmp_path, FakeGrid({}))
    with pytest.raises(RuntimeError, match="no silo could provide the initial adapter|no usable silo"):
        fed.run()


def test_connected_silos_that_all_fail_their_handshake_are_named_with_their_codes(tmp_path: Path) -> None:
    from flwr.app import Error, Message

    from silotune.silo_failures import SiloFailure, reason_for

    class RefusingGrid(FakeGrid):
        """Every silo refuses the run's app (a resident silo pinned to other code)."""

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            ids = []
            for i, m in enumerate(messages):
                mid = f"{len(self.outbox)}-{i}"
                m.metadata.__dict__["_message_id"] = mid
                code = SiloFailure.APP_NOT_ALLOWED
                reply = Message(Error(code=int(code), reason=reason_for(code)), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.outbox[mid] = reply
                ids.append(mid)
            return ids

    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    with pytest.raises(RuntimeError) as err:
        _fed(tmp_path, RefusingGrid(silos)).run()  # a new run: no silo gives the initial adapter
    named = "handshakes failed (node-1 APP_NOT_ALLOWED, node-2 APP_NOT_ALLOWED)"
    assert named in str(err.value)
    _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1}).run()
    with pytest.raises(RuntimeError) as err:
        _fed(tmp_path, RefusingGrid(silos), **{"num-rounds": 2}).run()  # resumed at round 2
    assert "round 2: no usable silo among the 2 connected" in str(err.value) and named in str(err.value)
    assert "within" not in str(err.value)  # not "none connected within wait-for-nodes": they were
