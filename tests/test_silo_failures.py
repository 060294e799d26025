"""What leaves a silo when it fails: a code and a fixed text, never the exception's words."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from monitoring.exporter import FederationState
from silo_node.app.client_app import reply_with_failure_code
from silotune import metrics as m
from silotune.errors import DataError, ModelMismatchError, NoLearningError, UserError
from silotune.silo_failures import (
    FIXED_TEXT,
    SiloFailure,
    classify,
    describe_error,
    failure_code,
    reason_for,
)
from silotune.wire_codec import CodecError

CANARY = "CANARY-7f3a diagnosis: patient 0042 has condition X"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NoLearningError(CANARY), SiloFailure.NO_LEARNING),
        (DataError(f"row 1: label {CANARY!r} is not in label-map"), SiloFailure.DATA_INVALID),
        (ModelMismatchError(CANARY), SiloFailure.MODEL_MISMATCH),
        (FloatingPointError(CANARY), SiloFailure.NONFINITE_LOSS),
        (MemoryError(CANARY), SiloFailure.OUT_OF_MEMORY),
        (UserError(CANARY), SiloFailure.CONFIG_REFUSED),
        (CodecError(CANARY), SiloFailure.ENCODING_REFUSED),
        (KeyError(CANARY), SiloFailure.INTERNAL),
    ],
)
def test_every_exception_maps_to_a_code_whose_text_holds_nothing_of_it(
    exc: Exception, code: SiloFailure
) -> None:
    assert classify(exc) == code
    assert CANARY not in reason_for(code) and "CANARY" not in reason_for(code)
    assert reason_for(code).startswith(f"{code.name}: ")


def test_every_code_has_a_fixed_text() -> None:
    assert set(FIXED_TEXT) == set(SiloFailure)


def test_the_central_site_records_only_code_and_fixed_text_whoever_sent_the_reply() -> None:
    # A SiloTune silo's code: the silo's own wording is not trusted either.
    assert describe_error(SiloFailure.DATA_INVALID, CANARY) == reason_for(SiloFailure.DATA_INVALID)
    # Flower's default reply for an unwrapped exception holds str(exception): only the class is kept.
    flower = describe_error(2, f"<class 'silo_node.app.data.DataError'>:<'{CANARY}'>")
    assert flower == "CLIENT_APP_RAISED_EXCEPTION: DataError (details in the silo's log)"
    assert describe_error(8, CANARY) == "CLIENT_APP_CRASHED: see the silo's log"
    assert describe_error(4242, CANARY) == "ERROR_4242: see the silo's log"
    assert failure_code(reason_for(SiloFailure.NO_LEARNING)) == "NO_LEARNING"
    assert failure_code("no reply within 30 s (strategy.round-timeout)") == ""


def test_a_failing_handler_replies_with_the_code_and_logs_the_detail_locally(
    caplog: pytest.LogCaptureFixture, flower_task_identity: int
) -> None:
    @reply_with_failure_code
    def train(msg: Message, context: Context) -> Message:
        raise DataError(f"row 1: label {CANARY!r} is not in label-map")

    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    msg = Message(content, dst_node_id=7, message_type="train")
    context = Context(
        run_id=flower_task_identity, node_id=7, node_config={}, state=RecordDict(), run_config={}
    )
    reply = train(msg, context)
    assert reply.has_error()
    assert reply.error.code == SiloFailure.DATA_INVALID
    assert reply.error.reason == reason_for(SiloFailure.DATA_INVALID)
    assert CANARY not in str(reply.error.reason)
    assert CANARY in caplog.text  # the detail stays in the silo's own log


def test_the_exporter_counts_rounds_that_learned_nothing() -> None:
    state = FederationState()
    state.apply({"kind": "silo_result", "silo": "bank-a", "node_id": 1, "round": 1})
    for rnd, code in ((2, "NO_LEARNING"), (3, "DATA_INVALID"), (4, "NO_LEARNING")):
        state.apply({"kind": "silo_failed", "silo": "bank-a", "node_id": 1, "round": rnd, "code": code})
    assert state.counters[m.SILO_ROUNDS_LEARNED_NOTHING.name][("bank-a",)] == 2
    assert state.counters[m.SILO_FAILURES.name][("bank-a",)] == 3
