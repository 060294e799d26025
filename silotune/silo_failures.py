"""What leaves a silo when it fails: a code and a fixed, data-free text. The detail stays at the silo.

Flower's default error reply carries ``str(exception)``, and SiloTune's own errors name what was
wrong precisely (a data error quotes the offending row). That precision belongs in the silo's own
log, not in the central site's events, ServerApp log and SuperLink database. So the ClientApp turns
every exception into one of these codes; the server only ever records the code's name and text.

Codes start at 1000, above Flower's own ``flwr.common.constant.ErrorCode`` values (0-8), so both
can travel in the same ``Error.code`` field.
"""

from __future__ import annotations

import re
from enum import IntEnum

from silotune.errors import (
    ApprovalPending,
    DataError,
    InitRefused,
    ModelMismatchError,
    NoLearningError,
    PolicyRefused,
    PrivacyBudgetExhausted,
    UserError,
)


class SiloFailure(IntEnum):
    NO_LEARNING = 1001
    DATA_INVALID = 1002
    MODEL_MISMATCH = 1003
    NONFINITE_LOSS = 1004
    OUT_OF_MEMORY = 1005
    CONFIG_REFUSED = 1006
    POLICY_REFUSED = 1007  # the run asks for more than the silo's own policy allows
    APPROVAL_PENDING = 1008  # not a failure: the run waits for the silo operator's approval
    APP_NOT_ALLOWED = 1009  # the run's app (FAB) is not the code the silo installed or allowed
    ENCODING_REFUSED = 1010  # the adapter the silo received is not in the run's wire format
    INIT_REFUSED = 1011  # the run's starting adapter is not the one this silo derives from its seed
    PRIVACY_BUDGET_EXHAUSTED = 1012  # the round would spend more epsilon than the silo's budget has left
    INTERNAL = 1099


# Fixed texts: nothing here may ever be built from the exception, the data or the config.
FIXED_TEXT: dict[SiloFailure, str] = {
    SiloFailure.NO_LEARNING: "the round changed no trainable parameter; see the silo's log",
    SiloFailure.DATA_INVALID: "the silo's data failed validation; see the silo's log",
    SiloFailure.MODEL_MISMATCH: "the silo's base model differs from the federation's",
    SiloFailure.NONFINITE_LOSS: "the training loss became non-finite; lower train.lr-max",
    SiloFailure.OUT_OF_MEMORY: "the silo ran out of memory; see the silo's log",
    SiloFailure.CONFIG_REFUSED: "the silo refused the run's configuration; see the silo's log",
    SiloFailure.POLICY_REFUSED: "the silo's policy refused this run; see the silo's log",
    SiloFailure.APPROVAL_PENDING: "the run waits for the silo operator's approval",
    SiloFailure.APP_NOT_ALLOWED: "the silo runs only the app it installed or allowed; see the silo's log",
    SiloFailure.ENCODING_REFUSED: "the adapter received is not in the run's transport format",
    SiloFailure.PRIVACY_BUDGET_EXHAUSTED: "the round would exceed the silo's privacy budget (epsilon)",
    SiloFailure.INIT_REFUSED: "the run's starting adapter is not the one this silo derives from train.seed",
    SiloFailure.INTERNAL: "the silo failed; see the silo's log",
}

# Flower's own codes (flwr.common.constant.ErrorCode), named for the central site's records.
_FLOWER_CODES = {
    0: "UNKNOWN",
    1: "LOAD_CLIENT_APP_EXCEPTION",
    2: "CLIENT_APP_RAISED_EXCEPTION",
    3: "MESSAGE_UNAVAILABLE",
    4: "REPLY_MESSAGE_UNAVAILABLE",
    5: "NODE_UNAVAILABLE",
    6: "MOD_FAILED_PRECONDITION",
    7: "INVALID_FAB",
    8: "CLIENT_APP_CRASHED",
}
_EXCEPTION_CLASS = re.compile(r"^<class '([A-Za-z_][\w.]*)'>")
_CODE_PREFIX = re.compile(r"^([A-Z][A-Z0-9_]+): ")


def classify(exc: BaseException) -> SiloFailure:
    """The code for an exception raised while a silo served a message."""
    if isinstance(exc, InitRefused):
        return SiloFailure.INIT_REFUSED
    if isinstance(exc, PolicyRefused):
        return SiloFailure.POLICY_REFUSED
    if isinstance(exc, ApprovalPending):
        return SiloFailure.APPROVAL_PENDING
    if isinstance(exc, PrivacyBudgetExhausted):
        return SiloFailure.PRIVACY_BUDGET_EXHAUSTED
    if isinstance(exc, NoLearningError):
        return SiloFailure.NO_LEARNING
    if isinstance(exc, DataError):
        return SiloFailure.DATA_INVALID
    if isinstance(exc, ModelMismatchError):
        return SiloFailure.MODEL_MISMATCH
    if isinstance(exc, FloatingPointError):
        return SiloFailure.NONFINITE_LOSS
    if isinstance(exc, MemoryError) or "out of memory" in type(exc).__name__.lower():
        return SiloFailure.OUT_OF_MEMORY
    if isinstance(exc, UserError):
        return SiloFailure.CONFIG_REFUSED
    from silotune.wire_codec import CodecError  # here: the codec needs numpy, this module does not

    if isinstance(exc, CodecError):
        return SiloFailure.ENCODING_REFUSED
    return SiloFailure.INTERNAL


def reason_for(code: SiloFailure) -> str:
    """The one text that travels with ``code``: ``NAME: fixed text``."""
    return f"{code.name}: {FIXED_TEXT[code]}"


def describe_error(code: int, reason: str | None) -> str:
    """What the central site records for an error reply, whoever sent it. Never the raw reason.

    A SiloTune code gets its own fixed text (the silo's wording is not trusted either). Flower's
    "ClientApp raised" reply holds ``str(exception)``, which may quote private data: only the
    exception's class name is kept. Other Flower codes are named.
    """
    try:
        known = SiloFailure(code)
    except ValueError:
        known = None
    if known is not None:
        return reason_for(known)
    name = _FLOWER_CODES.get(code, f"ERROR_{code}")
    match = _EXCEPTION_CLASS.match(reason or "")
    if code == 2 and match:
        return f"{name}: {match.group(1).rsplit('.', 1)[-1]} (details in the silo's log)"
    return f"{name}: see the silo's log"


def failure_code(description: str) -> str:
    """The code name at the front of a :func:`describe_error` text ('' for other texts)."""
    match = _CODE_PREFIX.match(description)
    return match.group(1) if match else ""
