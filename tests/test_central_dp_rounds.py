"""Central DP through the real round loop (superlink/app/rounds.py) on the scripted grid: the
release is the equal-weight mean of clipped deltas plus noise, its epsilon is in every round_end
event and in every checkpoint, survives a resume, and the run stops before passing max-epsilon."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from monitoring.exporter import FederationState
from silotune import metrics as m
from silotune import protocol as p
from silotune.events import read_events
from superlink.app.defences.central_dp import CentralAccountant
from tests.support.scripted_grid import INIT, FakeGrid, FakeSilo, events_of, make_federation

pytestmark = pytest.mark.usefixtures("flower_task_identity")
D = sum(v.size for v in INIT.values())  # 14 adapter values: an honest +1 everywhere has norm sqrt(14)


def _dp(**extra: object) -> dict[str, object]:
    return {"central-dp.enabled": True, "central-dp.clipping-norm": 1.0, **extra}


def _no_limit(**extra: object) -> dict[str, object]:
    """Near-zero noise spends a huge epsilon at once: these tests lift the default max-epsilon (8)."""
    return _dp(**{"central-dp.max-epsilon": 0.0}, **extra)


def test_the_release_is_the_equal_weight_mean_of_clipped_deltas_whatever_a_silo_declares(
    tmp_path: Path,
) -> None:
    # Two honest silos add +1; the liar declares 10^9 examples and adds -1000. Under central DP every
    # delta is clipped to norm 1 and counts once: the liar pulls by at most C/n, like any one silo.
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: FakeSilo("liar", n=10**9, delta=-1000.0)}
    fed = make_federation(
        tmp_path, FakeGrid(silos), **{"num-rounds": 1, **_no_limit(**{"central-dp.noise-multiplier": 1e-9})}
    )
    fed.run()
    unit = 1.0 / math.sqrt(D)  # each coordinate of a clipped +-1 delta
    for key, start in INIT.items():
        np.testing.assert_allclose(fed.global_state[key] - start, (2 * unit - unit) / 3, atol=1e-6)
    (end,) = events_of(tmp_path, p.EV_ROUND_END)
    assert end[p.CDP_NUM_SAMPLED] == 3 and end[p.CDP_NUM_UPDATES] == 3 and end[p.CDP_NUM_CLIPPED] == 3
    assert end[p.CDP_NOISE_STD] == pytest.approx(1e-9 / 3)
    assert not events_of(tmp_path, p.EV_ANOMALY)  # the defences are bypassed, by design


def test_the_noise_is_there_and_sized_by_the_silos_asked(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a", delta=0.0), 2: FakeSilo("b", delta=0.0)}
    fed = make_federation(
        tmp_path, FakeGrid(silos), **{"num-rounds": 1, **_dp(**{"central-dp.noise-multiplier": 2.0})}
    )
    fed.run()  # silos that send back exactly what they got: whatever moved the global is the noise alone
    moved = np.concatenate([(fed.global_state[k] - v).ravel() for k, v in INIT.items()])
    assert np.abs(moved).max() > 0  # a release without noise would have left the adapter where it was
    (end,) = events_of(tmp_path, p.EV_ROUND_END)
    assert end[p.CDP_NOISE_STD] == pytest.approx(2.0 * 1.0 / 2)


def test_epsilon_is_reported_every_round_and_kept_across_a_resume(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    cfg = _dp(**{"central-dp.noise-multiplier": 1.5})
    make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 2, **cfg}).run()
    make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 3, **cfg}).run()  # resumes round 3
    eps = [e[p.CDP_EPSILON] for e in events_of(tmp_path, p.EV_ROUND_END)]
    expected = []
    acc = CentralAccountant()
    for _ in range(3):
        acc.step(1.5, 1.0)
        expected.append(acc.epsilon(1e-5))
    assert eps == pytest.approx(expected)  # round 3 counts the two rounds before the restart
    # Prometheus: the exporter's gauge holds the run's epsilon after its last release.
    state = FederationState()
    for e in read_events(tmp_path / "run" / "events.jsonl"):
        state.apply(e)
    assert state.gauges[m.CENTRAL_DP_EPSILON.name] == {(): pytest.approx(expected[-1])}
    manifest = json.loads(next((tmp_path / "run").rglob("manifest.json")).read_text())
    assert p.CDP_MANIFEST_KEY in manifest


def test_the_run_stops_before_the_round_that_would_pass_max_epsilon(tmp_path: Path) -> None:
    acc = CentralAccountant()
    for _ in range(2):
        acc.step(1.0, 1.0)
    two = acc.epsilon(1e-5)
    acc.step(1.0, 1.0)
    three = acc.epsilon(1e-5)
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    cfg = _dp(**{"central-dp.noise-multiplier": 1.0, "central-dp.max-epsilon": (two + three) / 2})
    make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 5, **cfg}).run()
    (end,) = events_of(tmp_path, p.EV_RUN_END)
    assert end["status"] == p.RUN_DP_BUDGET_EXHAUSTED and end["rounds_completed"] == 2
    assert "central-dp.max-epsilon" in end["reason"]


def test_a_server_optimizer_steps_on_the_release(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    cfg = {"strategy.name": "fedadam", "num-rounds": 2, **_no_limit(**{"central-dp.noise-multiplier": 1e-9})}
    fed = make_federation(tmp_path, FakeGrid(silos), **cfg)
    fed.run()
    moved = fed.global_state["m.lora_A.weight"] - INIT["m.lora_A.weight"]
    assert (moved > 0).all()  # FedAdam followed the (clipped, equal-weight) honest direction


def test_a_run_cannot_switch_central_dp_on_midway(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1}).run()
    with pytest.raises(RuntimeError, match="central-dp.enabled"):
        make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 2, **_dp()}).run()


def test_the_raw_delta_norms_go_to_the_central_log_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Operators choose clipping-norm from them; they are not noised, so no event carries them."""
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    with caplog.at_level("INFO", logger="flwr"):
        make_federation(tmp_path, FakeGrid(silos), **{"num-rounds": 1, **_dp()}).run()
    line = next(r.getMessage() for r in caplog.records if "central DP delta norms" in r.getMessage())
    assert f"a {math.sqrt(D):.4g}" in line and f"b {math.sqrt(D):.4g}" in line
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert p.CDP_UPDATE_NORM not in events and p.CDP_CLIP_FACTOR not in events
