"""The admission ledger's one reader (silotune/admission_ledger.py), as the operator's tools and
the ServerApp use it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from silotune.admission_ledger import admitted_names, read_ledger
from silotune.errors import UserError


def _entry(name: str, node_id: str) -> dict[str, object]:
    return {"name": name, "node_id": node_id, "fingerprint": "f", "public_key": "k", "admitted_at": 0}


def test_the_operator_reads_it_strictly_and_the_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "admitted-silos.json"
    assert read_ledger(path) == {}
    path.write_text(json.dumps({"bank-b": _entry("bank-b", "7")}))
    assert read_ledger(path)["bank-b"].node_id == "7"
    path.write_text(json.dumps({"bank-b": {"name": "bank-b"}}))
    with pytest.raises(UserError, match=str(path)):
        read_ledger(path)


def test_the_server_app_reads_leniently_and_never_takes_a_silos_claim(tmp_path: Path) -> None:
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text(json.dumps({"hospital-a": _entry("hospital-a", "1"), "odd": _entry("odd", "x")}))
    bad.write_text("[not a ledger")
    assert admitted_names("") is None  # no ledger configured: self-reported names are all there is
    assert admitted_names(os.pathsep.join([str(bad), str(good), str(tmp_path / "gone.json")])) == {
        1: "hospital-a"
    }
