"""A synthetic federation written with the real EventLog, plus truth computed independently.

Other monitoring tests import ``write_synthetic_run`` and ``Truth`` from here (``tests`` is a
package). The numbers are chosen so every series and every dashboard panel has data: one GPU
silo near its memory capacity, two CPU silos, a failure, a rejected update, evaluations.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.synthetic_run import (
    ADAPTER_PARAMS,
    ROUNDS,
    SILOS,
    write_synthetic_run,
)


def test_synthetic_truth_is_self_consistent(tmp_path: Path) -> None:
    truth = write_synthetic_run(tmp_path / "run", tmp_path / "ev", {"hospital-a": tmp_path / "a"})
    payload = ADAPTER_PARAMS * 4
    assert truth.uplink["hospital-a"] == ROUNDS * payload
    assert truth.uplink["bank-c"] == (ROUNDS - 1) * payload  # failed in round 2
    sent = ROUNDS * len(SILOS) * payload
    assert truth.cumulative == sum(truth.uplink.values()) + sent
    assert (tmp_path / "a" / "silo.jsonl").read_text().count("\n") == ROUNDS
