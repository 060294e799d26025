"""What a silo's ``[privacy]`` policy will do to a run, before it serves one.

A privacy officer signs off on an epsilon; the operator also wants to know how much noise that
epsilon buys for the run's shape, and what a larger logical batch (the policy's
``min-logical-batch``) would change. This plans with the same function the silo uses for a real
round (silo_node/app/privacy.py ``plan_round``): the run's shape first, then the same records per
round in fewer, larger noisy steps. Nothing here trains or touches the ledger.

The "signal/noise" column is sqrt(steps of the run) x logical batch / noise multiplier, relative to
the run's shape: the noise per coordinate of a step's averaged gradient is noise multiplier x
max-grad-norm / logical batch, and T noisy steps add T signals but only sqrt(T) noises. It assumes
the clipped per-record gradients point alike across batches; benchmarks/dp_gradient_signal.py
measures that for a model and data, and BENCHMARKS.md ("Differential privacy at a silo") what
the shapes scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from silo_node.app.policy import PrivacyPolicy
from silo_node.app.privacy import epsilon_of, plan_round
from silotune.config import parse_run_config

__all__ = ["PlanRow", "plan_shapes"]


@dataclass(frozen=True)
class PlanRow:
    logical_batch: int  # expected records per noisy step (Poisson), after the policy's floor
    steps_per_round: int
    sample_rate: float
    noise_multiplier: float
    epsilon_run: float  # what the whole run spends on this dataset, from an empty ledger
    noise_per_coordinate: float  # noise multiplier x max-grad-norm / logical batch
    signal_to_noise: float  # relative to the run's own shape (first row = 1.0)


def plan_shapes(
    policy: PrivacyPolicy,
    records: int,
    rounds: int,
    local_steps: int,
    batch_size: int,
    grad_accum: int = 1,
) -> list[PlanRow]:
    """The run's shape, then the same records per round in fewer, larger steps: for each divisor
    d of the local steps, d times the logical batch in local-steps / d steps (so a round reads the
    same records and costs about the same compute), while the batch fits the records."""
    if min(records, rounds, local_steps, batch_size, grad_accum) < 1:
        raise ValueError("records, rounds, local steps, batch size and grad accum must be at least 1")
    logical0 = max(batch_size * grad_accum, policy.min_logical_batch)  # the policy's floor applies
    rows: list[PlanRow] = []
    base_snr = 0.0  # the run's own shape's sqrt(steps) x batch / sigma: the column's unit
    for d in (d for d in range(1, local_steps + 1) if local_steps % d == 0):
        accum = grad_accum if d == 1 else math.ceil(logical0 * d / batch_size)
        if d > 1 and batch_size * accum > records:
            break
        steps = local_steps // d
        run = parse_run_config(
            {"num-rounds": rounds, "train.local-steps": steps, "train.batch-size": batch_size,
             "train.grad-accum": accum},
            "the planned run",
        )  # fmt: skip
        plan = plan_round(policy, run, records)
        logical = plan.expected_batch_size
        snr = math.sqrt(steps * rounds) * logical / plan.noise_multiplier
        base_snr = base_snr or snr
        rows.append(
            PlanRow(
                logical_batch=logical,
                steps_per_round=steps,
                sample_rate=plan.sample_rate,
                noise_multiplier=plan.noise_multiplier,
                epsilon_run=epsilon_of(
                    [(plan.noise_multiplier, plan.sample_rate, steps * rounds)],
                    policy.delta,
                    policy.accountant,
                ),
                noise_per_coordinate=plan.noise_multiplier * policy.max_grad_norm / logical,
                signal_to_noise=snr / base_snr,
            )
        )
    return rows
