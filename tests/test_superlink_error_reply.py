"""An error reply that the SuperLink makes itself (the silo went offline: its link was cut) comes from
node 1, Flower's SUPERLINK_NODE_ID, not from the silo. Found by the link-down fault run
(tests/support/fault_links.py): the round loop took node 1 for a silo and the run failed with KeyError: 1."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType

from tests.support.scripted_grid import FakeGrid, FakeSilo, events_of, make_federation

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class OfflineInRound2(FakeGrid):
    """Node 2's training message of round 2 is answered by the SuperLink with an error."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for m, mid in zip(messages, ids, strict=True):
            if (m.metadata.dst_node_id == 2 and m.metadata.group_id == "2"
                    and m.metadata.message_type == MessageType.TRAIN):  # fmt: skip
                err = Message(Error(code=4, reason="node unavailable"), reply_to=m)
                err.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
                err.metadata.__dict__["_reply_to_message_id"] = mid
                self.outbox[mid] = err
        return ids


def test_a_superlink_error_reply_costs_that_silo_the_round_not_the_run(tmp_path: Path) -> None:
    grid = OfflineInRound2({2: FakeSilo("a"), 3: FakeSilo("b")})
    fed = make_federation(tmp_path, grid, **{"strategy.min-answers": 1})
    fed.run()
    (end,) = events_of(tmp_path, "run_end")
    assert end["status"] == "completed" and end["rounds_completed"] == 2, end
    failed = events_of(tmp_path, "silo_failed")
    assert [(e["round"], e["node_id"]) for e in failed] == [(2, 2)], failed
