"""HOST:PORT parsing, one home for the SuperLink address, the exporter's --bind and the probes."""

from __future__ import annotations

from silotune.errors import UserError


def split_host_port(address: str, option: str, example: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host without brackets, port); UserError naming
    ``option`` and showing ``example`` when the text is not HOST:PORT."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"{option} {address!r}: expected HOST:PORT, e.g. {example}")
    return host.strip("[]"), int(port)
