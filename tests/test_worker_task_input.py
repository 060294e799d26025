"""The resident worker gives up on a task whose message never becomes available (silo_node/ops/worker.py).

After a SuperLink restart the SuperNode can hand out a task for a message it then drops (its run is
no longer running). Flower's own pull waits up to two hours for that message's objects; the worker
serves one task at a time, so it would stop answering every later run (seen in the SuperLink-kill
fault runs: the resumed run's handshake got no reply for minutes). A fake Runtime API that never
makes the object available: the pull must fail within its bound."""

from __future__ import annotations

import time

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.supercore.run import Run

from silo_node.ops.worker import pull_task_input


class NeverAvailable:
    """A SuperNode Runtime API that has the task but never the message's objects."""

    def __init__(self) -> None:
        self.pulls = 0
        self.confirmed = False

    def PullTaskInput(self, _req: object) -> PullTaskInputResponse:  # noqa: N802 - Flower's name
        ctx = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
        return PullTaskInputResponse(
            task_id=11, context=context_to_proto(ctx), run=run_to_proto(Run.create_empty(7)),
            fab=fab_to_proto(Fab("0" * 64, b"", {})),
        )  # fmt: skip

    def PullMessages(self, _req: object) -> PullAppMessagesResponse:  # noqa: N802
        msg = Message(RecordDict(), dst_node_id=3, message_type="query")
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(msg)], message_object_trees=[ObjectTree(object_id="ab" * 32)]
        )

    def PullObject(self, _req: object) -> PullObjectResponse:  # noqa: N802
        self.pulls += 1
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(self, _req: object) -> None:  # noqa: N802
        self.confirmed = True


def test_a_message_that_never_arrives_is_given_up_within_the_bound() -> None:
    api = NeverAvailable()
    start = time.monotonic()
    with pytest.raises(ObjectPullError):
        pull_task_input(api, max_time=2.0)
    # Flower's default would keep trying for up to two hours; the bound holds (with backoff slack).
    assert time.monotonic() - start < 30
    assert api.pulls >= 2 and not api.confirmed
