"""Is this silo's clock close enough to the SuperLink's for Flower's node authentication?

With node authentication on, the SuperNode signs every request with its wall-clock time and the
SuperLink refuses a signature dated more than SYSTEM_TIME_TOLERANCE (5 s) in its future or more
than TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE (305 s) in its past. A refused SuperNode gets
HTTP 401, logs nothing about it and exits with code 0 ("terminated gracefully"), so without this
check a silo whose clock runs fast simply stops, with no reason given anywhere on the silo.

The SuperLink's clock is read from the Date header of one HTTPS request to its Fleet API (uvicorn
sends it on every response, 1 s resolution), over the same verified TLS the SuperNode uses.
"""

from __future__ import annotations

import http.client
import ssl
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

from silotune.addresses import split_host_port

__all__ = ["clock_problem", "diagnose_clock", "superlink_clock_offset"]

# Flower's window, from the SuperLink's side: it accepts a request signed at most this far ahead
# of its own clock, and at most this far behind. Copied from flwr.common.constant
# (SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE) rather than imported,
# because importing flwr costs the CLI almost a second; a test pins them to Flower's values.
MAX_AHEAD_S: float = 5.0
MAX_BEHIND_S: float = 305.0


def superlink_clock_offset(address: str, ca_cert: Path, timeout: float = 5.0) -> float | None:
    """Seconds this machine's clock is ahead of the SuperLink's (negative: behind).

    None when it cannot be measured (unreachable, TLS refused, no Date header): the caller's TLS
    diagnosis covers those cases, and a SuperLink that is not up yet is not an error.
    """
    host, port = split_host_port(address, "--superlink", "superlink.example.org:8000")
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.connect()  # TLS handshake outside the timed window
        before = time.time()
        conn.request("HEAD", "/")
        response = conn.getresponse()
        after = time.time()
        date = response.getheader("date")
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    if not date:
        return None
    try:
        server = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    # The header truncates to whole seconds: the SuperLink's clock read somewhere in
    # [server, server + 1) while the request was in flight, so compare the middles.
    return (before + after) / 2 - (server + 0.5)


def clock_problem(ahead_s: float) -> str | None:
    """Why Flower would refuse a silo whose clock is ``ahead_s`` seconds ahead of the SuperLink's
    (negative: behind), in words; None when the offset is inside Flower's window."""
    if ahead_s >= MAX_AHEAD_S:
        return (
            f"this machine's clock is {ahead_s:.0f} s ahead of the SuperLink's; Flower's node "
            f"authentication refuses requests signed more than {MAX_AHEAD_S:.0f} s in the "
            "SuperLink's future (HTTP 401, and the SuperNode exits without saying why). "
            "Synchronise the clock (NTP: `timedatectl set-ntp true`, or chrony) and start again"
        )
    if -ahead_s >= MAX_BEHIND_S:
        return (
            f"this machine's clock is {-ahead_s:.0f} s behind the SuperLink's; Flower's node "
            f"authentication refuses requests signed more than {MAX_BEHIND_S:.0f} s in the past "
            "(HTTP 401). Synchronise the clock (NTP: `timedatectl set-ntp true`, or chrony) and "
            "start again"
        )
    return None


def diagnose_clock(address: str, ca_cert: Path, timeout: float = 5.0) -> str | None:
    """``clock_problem`` for the SuperLink at ``address``; None if fine or not measurable."""
    offset = superlink_clock_offset(address, ca_cert, timeout)
    return None if offset is None else clock_problem(offset)
