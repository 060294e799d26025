"""Every call the ServerApp makes to Flower's Grid, retried on transient errors until a deadline.

The SuperLink keeps its state in SQLite; under load it answers HTTP 500 "database is locked", and
a restart or a full connection pool shows up as transport errors. Flower's own client retries only
connection errors and 502/503/504 (and those without end), so one 500 on any call used to end the
run. Here every Grid call (get_node_ids, push_messages, pull_messages) goes through one helper:
transient errors are retried with capped exponential backoff until the caller's deadline, then
reported as GridUnavailable naming the call; errors that retrying cannot fix (a malformed message,
4xx answers such as 401/403/404) are raised at once. Written by hand rather than with a retry
library because the deadline, the sleep and the clock must be the round's (tests inject them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import WARNING
from typing import TypeVar

from flwr.supercore import log

T = TypeVar("T")

# HTTP answers worth asking again: timeouts, throttling and server-side errors (500 is SQLite busy).
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Programming or message errors: the same call fails the same way every time.
_PERMANENT = (ValueError, TypeError, KeyError, AttributeError, AssertionError, NotImplementedError)


class GridUnavailable(RuntimeError):
    """A Grid call kept failing with transient errors until its deadline."""


def is_transient(exc: BaseException) -> bool:
    """True for errors a later attempt may not see (busy SuperLink, network, restart)."""
    response = getattr(exc, "response", None)  # httpx.HTTPStatusError, without importing httpx
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS
    return isinstance(exc, Exception) and not isinstance(exc, _PERMANENT)


class GridCalls:
    """Retries ``fn`` on transient errors with backoff ``first_delay * 2**k`` (capped at
    ``max_delay``) until ``deadline`` (on ``clock``); ``check`` runs before each wait, so a
    watchdog can end a round that is only retrying."""

    def __init__(
        self,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        first_delay: float = 0.5,
        max_delay: float = 10.0,
    ) -> None:
        self.sleep, self.clock = sleep, clock
        self.first_delay, self.max_delay = first_delay, max_delay
        self.retries = 0  # transient errors seen (for tests and logs)

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        deadline: float,
        check: Callable[[], None] | None = None,
    ) -> T:
        delay = self.first_delay
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                self.retries += 1
                if self.clock() + delay > deadline:
                    raise GridUnavailable(
                        f"the SuperLink kept failing {what} ({attempt} attempts until the deadline): {exc}"
                    ) from exc
                log(WARNING, "%s failed (%s); retrying in %.1f s", what, exc, delay)
            if check is not None:
                check()
            self.sleep(delay)
            delay = min(delay * 2, self.max_delay)
