"""The admission ledger: the name each admitted silo's node id was admitted under. One reader.

``silotune silos admit`` (superlink/ops/admission.py) writes it next to the operator's FLWR_HOME;
the ServerApp (superlink/app/rounds.py) reads it to name silos by their admission, never by what a
silo says about itself. Both read it here, so the file's format has one owner.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from silotune.errors import UserError

LEDGER_FILE = "admitted-silos.json"
# The ledger file(s) the ServerApp reads, os.pathsep-separated (set by superlink/ops/launch.py).
ADMISSIONS_ENV = "SILOTUNE_ADMISSIONS"


@dataclass(frozen=True)
class AdmittedSilo:
    name: str
    node_id: str
    fingerprint: str
    public_key: str
    admitted_at: float


def read_ledger(path: Path) -> dict[str, AdmittedSilo]:
    """The ledger at ``path`` (name -> entry); {} when it does not exist. An unreadable or malformed
    ledger is an error that names the file."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return {str(name): AdmittedSilo(**entry) for name, entry in raw.items()}
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read the admission ledger {path}: {exc}") from None


def admitted_names(spec: str | None = None) -> dict[int, str] | None:
    """node id -> admitted name, from the ledgers named by ``spec`` (default: $SILOTUNE_ADMISSIONS).

    None when no ledger is configured (plaintext development federations without admission): then
    the silos' self-reported names are all there is. A ledger that cannot be read counts as empty,
    so its silos are named ``node-<id>``, never by their own claim."""
    spec = os.environ.get(ADMISSIONS_ENV, "") if spec is None else spec
    if not spec:
        return None
    names: dict[int, str] = {}
    for part in spec.split(os.pathsep):
        try:
            ledger = read_ledger(Path(part))
        except UserError:
            continue
        for name, entry in ledger.items():
            try:
                names[int(entry.node_id)] = name
            except ValueError:
                continue
    return names
