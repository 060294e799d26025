"""The message exchange with Flower's Grid: push a round's messages, pull the replies until a deadline.

Every Grid call (get_node_ids, push_messages, pull_messages) is retried on transient errors until
the caller's deadline (``GridCalls``). The SuperLink keeps its state in SQLite; under load it answers
HTTP 500 "database is locked", and a restart or a full connection pool shows up as transport errors.
Flower's own client retries only connection errors and 502/503/504 (and those without end), so one
500 on any call used to end the run. Errors that retrying cannot fix (a malformed message, 4xx
answers such as 401/403/404) are raised at once. Written by hand rather than with a retry library
because the deadline, the sleep and the clock must be the round's (tests inject them).

The round watchdog (watchdog.py) may end any wait (RoundStalled), so no wait here is unbounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import WARNING
from typing import TypeVar

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from silotune import protocol as p
from silotune.events import EventLog
from silotune.silo_failures import describe_error
from superlink.app.watchdog import RoundStalled, Watchdog

# How often the ServerApp asks the SuperLink for replies while a round is out: a loopback call,
# cheap; every second cost a round half a second on average (benchmarks/round_overhead.py).
REPLY_POLL_SECONDS = 0.25

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


class Exchange:
    """Sends messages to silos over the Grid and collects their replies (``sleep``/``clock`` injectable).

    ``reply_seconds`` holds each silo's push-to-reply time of the last exchange: slow silos show there.
    """

    def __init__(
        self,
        grid: Grid,
        events: EventLog,
        watchdog: Watchdog,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grid, self.events, self.watchdog = grid, events, watchdog
        self.sleep, self.clock = sleep, clock
        self.calls = GridCalls(sleep, clock)
        self.reply_seconds: dict[int, float] = {}
        self._reply_node: dict[str, int] = {}  # message id -> silo node, last exchange

    def node_ids(self, deadline: float) -> list[int]:
        """The connected SuperNodes, asked until ``deadline`` while the SuperLink is busy."""
        return self.calls.call("get_node_ids", lambda: sorted(self.grid.get_node_ids()), deadline)

    def send(
        self, kind: str, contents: dict[int, RecordDict], server_round: int, timeout: float
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """(replies, errors) by silo node id: every silo in ``contents`` is in one of the two; an
        error is a code and a fixed text (silotune/silo_failures.py), never the silo's own wording."""
        messages = [
            Message(content=c, dst_node_id=nid, message_type=kind, group_id=str(server_round))
            for nid, c in contents.items()
        ]
        replies: dict[int, Message] = {}
        errors: dict[int, str] = {}
        pulled, missing = self._push_and_pull(messages, server_round, timeout)
        for reply in pulled:
            # An error reply the SuperLink makes itself (the silo went offline) comes from node 1,
            # Flower's SUPERLINK_NODE_ID: the message it answers names the silo.
            nid = self._reply_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                # Only a code and a fixed text are recorded: the silo's wording stays at the silo.
                errors[nid] = describe_error(reply.error.code, reply.error.reason)
            else:
                replies[nid] = reply
        for nid in contents:
            if nid not in replies and nid not in errors:
                errors[nid] = missing or f"no reply within {timeout:.0f} s (strategy.round-timeout)"
        return replies, errors

    def _push_and_pull(
        self, messages: list[Message], server_round: int, timeout: float
    ) -> tuple[list[Message], str]:
        """Push, then pull replies until all came or ``timeout`` passed. Every Grid call is retried on
        transient SuperLink errors (e.g. its SQLite state busy: HTTP 500 "database is locked") until
        that deadline (GridCalls), and the watchdog may end the wait (RoundStalled), so no wait
        here is unbounded. Returns the replies and, if the SuperLink itself failed, why the rest
        are missing ("" when they simply did not answer in time)."""
        if not messages:
            return [], ""
        deadline = self.clock() + timeout
        # Handshakes are not watched: a silent new silo must not fail the round (see watchdog.py).
        watched = messages[0].metadata.message_type != MessageType.QUERY
        check = self.watchdog.check if watched else None
        self.watchdog.progress()  # a new exchange starts: the server moved on
        self.reply_seconds = {}
        try:
            ids = list(
                self.calls.call("push_messages", lambda: self.grid.push_messages(messages), deadline, check)
            )
        except GridUnavailable as exc:
            return [], str(exc)
        pushed_at = self.clock()
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=False) if mid}
        self._reply_node = dict(node_of)  # message id -> silo, for send
        pending = set(node_of)
        phase = messages[0].metadata.message_type
        got: list[Message] = []

        def take(batch: list[Message]) -> None:
            for reply in batch:
                mid = reply.metadata.reply_to_message_id
                pending.discard(mid)
                nid = node_of.get(mid, reply.metadata.src_node_id)
                self.reply_seconds[nid] = seconds = self.clock() - pushed_at
                # One line per reply: the exporter's progress signal while a round is under way.
                self.events.emit(
                    p.EV_SILO_REPLY, round=server_round, node_id=nid, phase=phase, reply_seconds=seconds
                )
            got.extend(batch)
            if batch:
                self.watchdog.progress()

        while pending and self.clock() < deadline:
            try:
                take(self._pull(pending, deadline, check))
            except GridUnavailable as exc:
                return got, str(exc)
            except RoundStalled as exc:  # while retrying a busy SuperLink
                if got:
                    return got, str(exc)
                raise
            if not pending:
                break
            late = self.watchdog.overdue() if watched else ""
            if late or self.clock() >= deadline:
                # A pull can block far past the deadline: Flower's Grid waits for every object of
                # a reply whose sender died mid-upload (minutes, until the SuperLink gives up on
                # it). Replies that arrived meanwhile are collected before the rest are given up.
                try:
                    take(self._pull(pending, self.clock() + REPLY_POLL_SECONDS))
                except GridUnavailable:
                    pass  # the SuperLink failed it: the rest are given up as they would have been
                if not pending:
                    break
            if late and not got:
                raise RoundStalled(late)  # nothing at all came back: the round has failed
            if late:
                return got, late  # the rest are dropped; the round goes on with what came
            if self.clock() < deadline:
                self.sleep(REPLY_POLL_SECONDS)
        return got, ""

    def _pull(
        self, pending: set[str], deadline: float, check: Callable[[], None] | None = None
    ) -> list[Message]:
        """The replies to ``pending`` that have come, retried on transient errors until ``deadline``."""
        return list(
            self.calls.call("pull_messages", lambda: self.grid.pull_messages(pending), deadline, check)
        )
