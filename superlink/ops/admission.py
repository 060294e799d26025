"""Admitting silos: register a silo's public node key with the SuperLink under a name.

Flower identifies a SuperNode by its public key (`flwr supernode register KEY.pub CONN --name N`)
but `flwr supernode list` shows node ids only, not names. SiloTune therefore keeps a small ledger
next to its FLWR_HOME (``admitted-silos.json``: name -> node id, fingerprint, key) so operators
can list and remove silos by name, and compare fingerprints with what each silo printed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from certs.node_key import check_node_public_key
from silotune.admission_ledger import LEDGER_FILE, AdmittedSilo, read_ledger
from silotune.atomic_files import atomic_write_json
from silotune.errors import UserError
from silotune.flwr_connection import DEFAULT_CONNECTION, run_flwr


@dataclass(frozen=True)
class SiloStatus:
    node_id: str
    name: str | None  # None: registered outside SiloTune (no ledger entry)
    status: str  # Flower's: "registered", "online", "offline", "unregistered"...
    fingerprint: str | None
    online_at: str | None


def _ledger_path(flwr_home: Path) -> Path:
    return Path(flwr_home) / LEDGER_FILE


def load_ledger(flwr_home: Path) -> dict[str, AdmittedSilo]:
    return read_ledger(_ledger_path(flwr_home))


def _save_ledger(flwr_home: Path, ledger: dict[str, AdmittedSilo]) -> None:
    atomic_write_json(_ledger_path(flwr_home), {n: asdict(s) for n, s in ledger.items()}, sort_keys=False)


def _flwr_json(args: list[str], flwr_home: Path, timeout: float, netns: str | None) -> dict[str, Any]:
    """Run a `flwr ... --format json` command and return its JSON object, or raise UserError."""
    res = run_flwr([*args, "--format", "json"], flwr_home, timeout=timeout, netns=netns)
    payload: dict[str, Any] | None = None
    start = res.stdout.find("{")
    if start >= 0:
        try:
            payload = json.loads(res.stdout[start:])
        except json.JSONDecodeError:
            payload = None
    if res.returncode == 0 and payload and payload.get("success", False):
        return payload
    detail = (payload or {}).get("error-message") or (res.stderr or res.stdout).strip()
    lines = [ln for ln in str(detail).splitlines() if ln.strip()]
    raise UserError(f"`flwr {' '.join(args[:2])}` failed: {' '.join(lines[-3:]) or 'no output'}")


def admit_silo(
    public_key: Path,
    name: str,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 60.0,
    netns: str | None = None,
) -> AdmittedSilo:
    """Register ``public_key`` under ``name``; refuse a reused name or an already admitted key."""
    fingerprint = check_node_public_key(public_key)
    ledger = load_ledger(flwr_home)
    if name in ledger:
        raise UserError(
            f"a silo named {name!r} is already admitted (node {ledger[name].node_id}); "
            f"remove it first with `silotune silos remove {name}`"
        )
    for other in ledger.values():
        if other.fingerprint == fingerprint:
            raise UserError(
                f"this key ({fingerprint}) is already admitted as {other.name!r}; "
                "every silo needs its own node key"
            )
    payload = _flwr_json(
        ["supernode", "register", str(Path(public_key).resolve()), connection, "--name", name],
        flwr_home,
        timeout,
        netns,
    )
    silo = AdmittedSilo(
        name=name,
        node_id=str(payload["node-id"]),
        fingerprint=fingerprint,
        public_key=Path(public_key).read_text(encoding="ascii").strip(),
        admitted_at=time.time(),
    )
    ledger[name] = silo
    _save_ledger(flwr_home, ledger)
    return silo


def list_silos(
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 60.0,
    netns: str | None = None,
) -> list[SiloStatus]:
    """Nodes the SuperLink knows, joined with the ledger's names and fingerprints."""
    payload = _flwr_json(["supernode", "list", connection], flwr_home, timeout, netns)
    by_id = {s.node_id: s for s in load_ledger(flwr_home).values()}
    out = []
    for node in payload.get("nodes", []):
        node_id = str(node.get("node-id"))
        known = by_id.get(node_id)
        online = node.get("online-at")
        out.append(
            SiloStatus(
                node_id=node_id,
                name=known.name if known else None,
                status=str(node.get("status", "?")),
                fingerprint=known.fingerprint if known else None,
                online_at=None if online in (None, "N/A") else str(online),
            )
        )
    return out


def remove_silo(
    name_or_id: str,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 60.0,
    netns: str | None = None,
) -> str:
    """Unregister a silo by ledger name or node id; return the node id removed."""
    ledger = load_ledger(flwr_home)
    if name_or_id in ledger:
        node_id = ledger[name_or_id].node_id
    elif name_or_id.isdigit():
        node_id = name_or_id
    else:
        known = ", ".join(sorted(ledger)) or "none"
        raise UserError(f"no admitted silo named {name_or_id!r} (known: {known}); or give a node id")
    _flwr_json(["supernode", "unregister", node_id, connection], flwr_home, timeout, netns)
    for n in [n for n, s in ledger.items() if s.node_id == node_id]:
        del ledger[n]
    _save_ledger(flwr_home, ledger)
    return node_id
