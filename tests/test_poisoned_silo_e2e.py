"""Real processes: a SuperLink and three SuperNodes on loopback (tests/test_federation_e2e.py's set-up),
one of which runs a ClientApp that poisons its replies (tests/support/poisoned_client_app.py). The poisoned
update is clipped and flagged in round 1, the forged example count rejected in round 2, and the run
completes with the honest silos' updates."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from demo.local_federation import LocalFederation, SiloSpec
from silotune import protocol as p
from tests.support.federation_runs import run_config as _run_config
from tests.support.federation_runs import run_events as _events
from tests.support.federation_runs import write_silo_data as _write_silo_data
from tests.support.tiny_model import make_tiny_llama

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _poisoned_app_dir(dest: Path) -> Path:
    """A Flower App directory whose ClientApp is tests/support/poisoned_client_app.py (ServerApp
    unchanged)."""
    dest.mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r'(?m)^clientapp = ".*"$', 'clientapp = "poisoned_client_app:app"', text)
    # The packages themselves come from the installed (editable) silotune, not from the FAB.
    text, n = re.subn(r"(?ms)^fab-include = \[.*?\]$", 'fab-include = ["*.py"]', text)
    assert n == 1, "pyproject.toml's fab-include not found"
    (dest / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "tests" / "support" / "poisoned_client_app.py", dest / "poisoned_client_app.py")
    return dest


def test_a_poisoning_silo_is_clipped_then_rejected_and_the_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILOTUNE_APP_DIR", str(_poisoned_app_dir(tmp_path / "app")))
    model = make_tiny_llama(tmp_path / "tiny-llama")
    silos = []
    for i, name in enumerate(["hospital-a", "hospital-b", "evil"]):
        data = tmp_path / f"{name}.jsonl"
        _write_silo_data(data, seed=i)
        silos.append(SiloSpec(name, data, {"columns": "input=text,output=label"}))
    # The poisoned app is not the SiloTune the silos installed, so a resident worker would refuse
    # it (APP_NOT_ALLOWED, tests/test_resident_worker.py): a malicious silo runs its own code, and
    # Flower's per-message executor runs whatever app it is given, which is what this test needs.
    with LocalFederation(tmp_path / "ws", silos, executor="per-message") as fed:
        result = fed.submit(_run_config(model, "poisoned"), timeout=900)
        events = _events(fed, "poisoned")
    assert [r["round"] for r in result.rounds] == [1, 2]
    by_kind = lambda kind: [e for e in events if e["kind"] == kind]  # noqa: E731
    evil = {e["node_id"] for e in by_kind("silo_result") if e["silo"] == "evil"}
    scores = {(e["round"], e["silo"]): e for e in by_kind(p.EV_ANOMALY)}
    assert scores[(1, "evil")]["flagged"] and scores[(1, "evil")]["clip_factor"] < 0.1
    assert not scores[(1, "hospital-a")]["flagged"] and scores[(1, "hospital-a")]["clip_factor"] == 1.0
    rejected = [e for e in by_kind(p.EV_UPDATE_REJECTED) if e["node_id"] in evil]
    assert [(e["round"], e["code"]) for e in rejected] == [(2, p.R_EXAMPLES_GREW)]
    ends = by_kind("round_end")
    assert [e["answered"] for e in ends] == [3, 2] and all(e["adapter_updated"] for e in ends)
    assert by_kind("run_end")[-1]["status"] == "completed"
