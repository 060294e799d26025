"""Faults survived, on real processes (issue 15): a TLS SuperLink with node auth and two silos on
loopback training a tiny random Llama; a process is killed, stopped or starved of disk mid-round.

One repetition per scenario here (CI); benchmarks/faults.py runs the full counts and prints the
figures of the README's reliability table. Each test prints its tally line.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fault_federation import (
    FaultFederation,
    Tally,
    central_kill,
    disk_full,
    silo_kill,
    silo_specs,
    stalled_silos,
)
from tests.support.tiny_model import make_tiny_llama

pytestmark = pytest.mark.slow

SILOS = ["hospital-a", "hospital-b"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFederation]:
    ws = tmp_path_factory.mktemp("faults")
    with FaultFederation(ws / "workspace", silo_specs(ws, SILOS)) as federation:
        yield federation


def _report(t: Tally) -> None:
    print(f"\n{t.scenario}: {int(t.survived)}/1 survived, {t.rounds_lost} rounds lost, "
          f"{t.corrupt_checkpoints} corrupt checkpoints; {t.detail}")  # fmt: skip


def test_superlink_killed_mid_round_resumes_on_restart(fed: FaultFederation, model: Path) -> None:
    t = central_kill(fed, model, 0, random.Random(1), "superlink", rounds=2, kill_round=2)
    _report(t)
    assert t.survived, t.detail
    assert t.rounds_lost == 0 and t.corrupt_checkpoints == 0


def test_serverapp_killed_mid_round_resumes_on_restart(fed: FaultFederation, model: Path) -> None:
    t = central_kill(fed, model, 0, random.Random(2), "serverapp", rounds=2, kill_round=2)
    _report(t)
    assert t.survived, t.detail
    assert t.rounds_lost == 0 and t.corrupt_checkpoints == 0


def test_killed_silo_rejoins_and_the_round_completes(fed: FaultFederation, model: Path) -> None:
    t = silo_kill(fed, model, 0, random.Random(3), rounds=3, kill_round=1)
    _report(t)
    assert t.survived, t.detail


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_stalled_silos_fail_the_round_and_the_alert_holds(
    fed: FaultFederation, model: Path, tmp_path: Path
) -> None:
    from tests.support.monitoring_stack import exporter, prometheus

    with (
        exporter(fed.events_dir, "server", tmp_path / "exporter.log") as central,
        prometheus(tmp_path / "prom", central, []) as prom,
    ):
        t = stalled_silos(fed, model, 0, random.Random(4), prom)
    _report(t)
    assert t.survived, t.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_during_a_checkpoint_keeps_the_last_and_resumes(fed: FaultFederation, model: Path) -> None:
    t = disk_full(fed, model, 0, random.Random(5))
    _report(t)
    assert t.survived, t.detail
