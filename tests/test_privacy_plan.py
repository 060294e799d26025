"""`silotune silo privacy-plan`: what a silo's [privacy] policy does to a run's shape, before it serves one.

The plan must be the silo's own (plan_round, the function a real round uses) and its epsilon
Opacus's; the larger-batch shapes must read the same records per round. Why it exists: DP's accuracy
turns on the records per noisy step (BENCHMARKS.md, "Differential privacy at a silo").
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from command_line.main import main
from silo_node.app.policy import PrivacyPolicy
from silo_node.app.privacy import plan_round
from silo_node.ops.privacy_plan import plan_shapes
from silotune.config import parse_run_config


def _run(rounds: int, steps: int, batch: int, accum: int) -> object:
    return parse_run_config(
        {
            "num-rounds": rounds,
            "train.local-steps": steps,
            "train.batch-size": batch,
            "train.grad-accum": accum,
        }
    )


def test_target_epsilon_shapes_spend_the_target_on_the_same_records() -> None:
    policy = PrivacyPolicy(target_epsilon=8, epsilon_budget=8, max_grad_norm=0.5)
    rows = plan_shapes(policy, records=3000, rounds=4, local_steps=10, batch_size=16, grad_accum=4)
    # Divisors of 10 steps: 64 x 10, 128 x 5, 320 x 2, 640 x 1; all read 640 records a round.
    assert [(r.logical_batch, r.steps_per_round) for r in rows] == [(64, 10), (128, 5), (320, 2), (640, 1)]
    first = plan_round(policy, _run(4, 10, 16, 4), 3000)
    assert rows[0].noise_multiplier == first.noise_multiplier
    assert rows[0].sample_rate == pytest.approx(64 / 3000)
    for r in rows:
        assert 7.9 < r.epsilon_run <= 8.0 + 1e-6  # calibrated to the target, never above it
        assert r.noise_per_coordinate == pytest.approx(r.noise_multiplier * 0.5 / r.logical_batch)
    # Noise grows slower than the batch at a fixed epsilon: fewer, larger steps carry more signal.
    snr = [r.signal_to_noise for r in rows]
    assert snr[0] == 1.0 and snr == sorted(snr) and snr[-1] > 2
    assert [r.noise_multiplier for r in rows] == sorted(r.noise_multiplier for r in rows)


def test_fixed_noise_policy_keeps_sigma_and_reports_opacus_epsilon() -> None:
    policy = PrivacyPolicy(noise_multiplier=0.9, epsilon_budget=50, min_logical_batch=100)
    rows = plan_shapes(policy, records=2000, rounds=3, local_steps=4, batch_size=8, grad_accum=2)
    # The policy's floor (100) raises the run's 16; the larger shapes start from it.
    assert rows[0].logical_batch == 100 and rows[0].steps_per_round == 4
    assert [r.noise_multiplier for r in rows] == [0.9] * len(rows)
    for r in rows:
        acc = RDPAccountant()
        acc.history = [(0.9, r.sample_rate, r.steps_per_round * 3)]
        assert r.epsilon_run == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    # At a fixed sigma a larger sampling rate costs more epsilon: the table must show it.
    assert rows[-1].epsilon_run > rows[0].epsilon_run


def test_shapes_stop_where_the_batch_outgrows_the_records() -> None:
    policy = PrivacyPolicy(target_epsilon=4, epsilon_budget=4)
    rows = plan_shapes(policy, records=200, rounds=2, local_steps=8, batch_size=16, grad_accum=2)
    assert [r.logical_batch for r in rows] == [32, 64, 128]  # 256 > 200 records: not offered
    with pytest.raises(ValueError, match="at least 1"):
        plan_shapes(policy, records=0, rounds=2, local_steps=8, batch_size=16)


def test_cli_prints_the_plan_and_names_a_policy_without_privacy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pol = tmp_path / "policy.toml"
    pol.write_text("[privacy]\ntarget-epsilon = 8\nepsilon-budget = 10\nmax-grad-norm = 0.5\n")
    args = ["silo", "privacy-plan", "--policy", str(pol), "--records", "3000", "--rounds", "5"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([*args, "--local-steps", "2", "--batch-size", "32", "--grad-accum", "8"]) == 0
    out = capsys.readouterr().out
    assert "target-epsilon 8" in out and "epsilon-budget 10" in out
    # The noise search's harmless Opacus warning does not reach the operator (noise_for_target).
    assert not [w for w in seen if "Optimal order" in str(w.message)]
    assert main([*args, "--local-steps", "2", "--batch-size", "32", "--grad-accum", "8", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["logical_batch"], r["steps_per_round"]) for r in rows] == [(256, 2), (512, 1)]
    assert math.isclose(rows[0]["signal_to_noise"], 1.0)

    plain = tmp_path / "plain.toml"
    plain.write_text("max-rounds = 10\n")
    assert main(["silo", "privacy-plan", "--policy", str(plain), "--records", "10", "--rounds", "1",
                 "--local-steps", "1", "--batch-size", "1"]) == 2  # fmt: skip
    assert f"{plain} has no [privacy] section" in capsys.readouterr().err
