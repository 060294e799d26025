"""DP at a silo beside the rest of a run (issue 24, item 6): the real ClientApp behind the scripted grid.

Each silo is SiloTune's own ClientApp (silo_node/app/client_app.py) with its own context, policy and
state dir, training a tiny model; the central site is the real round loop (superlink/app/rounds.py).
One silo's policy has ``[privacy]``, the others' do not, and each test adds one more feature:
the default robust aggregator (consensus) with compressed transport, kept AdamW state, FlexLoRA
ranks. What must hold: the run completes with every silo's update, only the DP silo spends and
reports epsilon, and its ledger records exactly the rounds it trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from silo_node.app.audit import read_audit
from silo_node.app.privacy import privacy_summary
from silotune import protocol as p
from tests.support.clientapp_silo import ClientAppSilo
from tests.support.scripted_grid import FakeGrid, events_of, make_federation

pytestmark = [pytest.mark.usefixtures("flower_task_identity"), pytest.mark.slow]  # real training, 3 silos

DP_POLICY = (
    "allow-local-paths = true\n[privacy]\nnoise-multiplier = 1.0\nmax-grad-norm = 1.0\nepsilon-budget = 50\n"
)
PLAIN_POLICY = "allow-local-paths = true\n"


def _run(
    tmp_path: Path, tiny_model: Path, ranks: tuple[int | None, ...] = (None, None, None), **cfg: Any
) -> Any:
    run = {"model.name": str(tiny_model), "num-rounds": 3, "peft.rank": 4, "train.batch-size": 4,
           "train.local-steps": 2, "train.seq-length": 48, "train.lr-max": 1e-2, "strategy.min-nodes": 3,
           "strategy.round-timeout": 600.0,
           **cfg}  # fmt: skip
    silos = {
        1: ClientAppSilo(tmp_path, "dp-silo", run, DP_POLICY, ranks[0]),
        2: ClientAppSilo(tmp_path, "plain-a", run, PLAIN_POLICY, ranks[1]),
        3: ClientAppSilo(tmp_path, "plain-b", run, PLAIN_POLICY, ranks[2]),
    }
    server_cfg = {k: v for k, v in run.items() if k != "model.name"}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"model.name": str(tiny_model), **server_cfg})
    fed.run()
    return fed, silos


def _check(tmp_path: Path, fed: Any, silos: dict[int, ClientAppSilo], rounds: int = 3) -> None:
    assert events_of(tmp_path, "run_end")[-1]["status"] == "completed"
    results = events_of(tmp_path, "silo_result")
    spent = [e[p.DP_EPSILON_SPENT] for e in results if e["silo"] == "dp-silo"]
    assert len(spent) == rounds and spent == sorted(spent) and spent[0] > 0
    assert all(p.DP_EPSILON_SPENT not in e for e in results if e["silo"] != "dp-silo")
    assert {e["answered"] for e in events_of(tmp_path, "round_end")} == {3}
    assert all(np.isfinite(v).all() for v in fed.global_state.values())
    ledger = privacy_summary(silos[1].state_dir)
    assert len(ledger) == 1 and sum(r["rounds"] for r in ledger[0]["runs"].values()) == rounds
    assert ledger[0]["epsilon_spent"] == pytest.approx(spent[-1], rel=1e-9)
    assert privacy_summary(silos[2].state_dir) == []  # the plain silos keep no ledger


def test_one_dp_silo_beside_plain_ones_under_the_default_aggregator_and_int8_transport(
    tmp_path: Path, tiny_model: Path
) -> None:
    fed, silos = _run(tmp_path, tiny_model, **{"transport.dtype": "int8"})
    _check(tmp_path, fed, silos)
    assert fed.cfg.strategy.aggregator == "consensus"
    scores = events_of(tmp_path, "anomaly_score")
    assert {e["aggregator"] for e in scores} == {"consensus"}
    # What the default did with the noisier silo is reported every round (kept or not).
    assert {e["silo"] for e in scores} == {"dp-silo", "plain-a", "plain-b"}


def test_dp_with_kept_optimizer_state(tmp_path: Path, tiny_model: Path) -> None:
    fed, silos = _run(tmp_path, tiny_model, **{"train.keep-optimizer-state": True})
    _check(tmp_path, fed, silos)
    for silo in silos.values():  # every silo, the DP one included, kept its AdamW state on disk
        assert list((silo.state_dir / "optimizer").glob("*.safetensors"))


def test_dp_at_a_flexlora_silo_of_another_rank(tmp_path: Path, tiny_model: Path) -> None:
    fed, silos = _run(tmp_path, tiny_model, ranks=(2, 4, 4), **{"strategy.name": "flexlora"})
    _check(tmp_path, fed, silos)
    ranks = {e["silo"]: e.get("lora_rank") for e in events_of(tmp_path, "silo_result")}
    assert ranks["dp-silo"] == 2 and ranks["plain-a"] == 4


def test_a_dp_silo_refuses_a_dora_run_at_its_handshake_and_the_others_train_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    # Opacus takes no per-sample gradients of DoRA's magnitude vectors (or IA3's scaling vectors):
    # the DP silo says so once, when the run starts, instead of failing every round.
    run = {"model.name": str(tiny_model), "num-rounds": 2, "peft.method": "dora", "peft.rank": 4,
           "train.batch-size": 4, "train.local-steps": 1, "train.seq-length": 48,
           "strategy.min-nodes": 2, "strategy.round-timeout": 600.0}  # fmt: skip
    silos = {
        1: ClientAppSilo(tmp_path, "dp-silo", run, DP_POLICY, strict=False),
        2: ClientAppSilo(tmp_path, "plain-a", run, PLAIN_POLICY),
        3: ClientAppSilo(tmp_path, "plain-b", run, PLAIN_POLICY),
    }
    server_cfg = {k: v for k, v in run.items() if k != "model.name"}
    fed = make_federation(tmp_path, FakeGrid(silos), **{"model.name": str(tiny_model), **server_cfg})
    fed.run()
    assert events_of(tmp_path, "run_end")[-1]["status"] == "completed"
    trained = sorted((e["round"], e["silo"]) for e in events_of(tmp_path, "silo_result"))
    assert trained == [(1, "plain-a"), (1, "plain-b"), (2, "plain-a"), (2, "plain-b")]
    reasons = {e["reason"] for e in read_audit(silos[1].state_dir) if e["kind"] == "refused"}
    assert reasons and all("supports peft.method lora or qlora" in r and "'dora'" in r for r in reasons)
    assert privacy_summary(silos[1].state_dir) == []  # refused before any round: nothing spent
