"""The round watchdog: a round that makes no progress for too long is failed, not waited on.

Progress is a training or evaluation exchange starting, or a reply arriving. The bound is
``strategy.watchdog-factor`` times the expected round time: the median duration of the rounds
completed so far (robust to one slow round), or ``strategy.round-timeout`` before any completed,
and never under MIN_BOUND_SECONDS (one pull poll is a second; short test rounds must not trip it).
The round loop asks ``overdue()`` between pulls and between Grid retries. Past the bound, an
exchange that got no reply at all fails the round (RoundStalled) and the run goes on with the next
round, or ends cleanly after MAX_CONSECUTIVE_STALLS stalled rounds in a row; an exchange that got
some replies stops waiting and drops the silent silos with the watchdog's reason.

Handshakes are not watched: a silent new silo costs at most one round-timeout there, and failed
handshakes back off (silo_registry.py).

The exporter gets ``progress_timeout_seconds`` in run_start and round_start events: the longest
silence a healthy run has in its event log. A ServerApp that cannot run its own watchdog (killed,
or blocked inside a Grid call) then still shows in Prometheus: silotune_last_progress_timestamp_seconds
stops moving and SiloTuneNoProgress fires.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# Stalled rounds in a row after which the run ends (status "stalled") instead of trying again:
# by then the federation, not one round, is stuck.
MAX_CONSECUTIVE_STALLS = 3
MIN_BOUND_SECONDS = 60.0
# Aggregation, checkpointing and event writes between two progress events.
PROGRESS_GRACE_SECONDS = 60.0


class RoundStalled(RuntimeError):
    """No progress within the watchdog's bound; the message says how long and why that bound."""


def progress_timeout(wait_for_nodes: float, round_timeout: float) -> float:
    """The longest a healthy run goes without a progress event: a round's wait for silos, then one
    exchange's wait for replies (never longer than round-timeout), plus grace."""
    return wait_for_nodes + round_timeout + PROGRESS_GRACE_SECONDS


class Watchdog:
    def __init__(
        self, factor: float, round_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.factor, self.round_timeout, self.clock = factor, round_timeout, clock
        self.durations: list[float] = []
        self.last_progress = clock()

    def expected_round_seconds(self) -> float:
        return statistics.median(self.durations) if self.durations else self.round_timeout

    def bound(self) -> float:
        """Seconds without progress after which the round is failed."""
        return max(MIN_BOUND_SECONDS, self.factor * self.expected_round_seconds())

    def progress(self) -> None:
        self.last_progress = self.clock()

    def round_completed(self, duration_seconds: float) -> None:
        self.durations.append(duration_seconds)

    def overdue(self) -> str:
        """Why the current exchange is stalled, or "" while it is within the bound."""
        silent = self.clock() - self.last_progress
        if silent <= self.bound():
            return ""
        basis = (
            f"median of {len(self.durations)} completed rounds"
            if self.durations
            else "strategy.round-timeout, no round completed yet"
        )
        return (
            f"watchdog: no progress for {silent:.0f} s, more than strategy.watchdog-factor "
            f"{self.factor:g} x expected round time {self.expected_round_seconds():.0f} s ({basis})"
        )

    def check(self) -> None:
        """Raise RoundStalled when overdue (used between Grid retries)."""
        reason = self.overdue()
        if reason:
            raise RoundStalled(reason)
