"""train.keep-optimizer-state: a silo's AdamW state carried from round to round, kept at the silo.

Off by default (FlowerTune's fresh AdamW per round). On: round 2 starts from round 1's moments and
step count, at round 2's own lr; a state that does not fit, or a file that cannot be read, costs a
warning and a fresh optimizer, never the round; nothing of it is in the reply.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from silo_node.app.optimizer_state import (
    FORMAT,
    OptimizerStore,
    apply_state,
    export_state,
    from_tensors,
    mismatch,
    to_tensors,
)
from silo_node.app.templates import get_template
from silo_node.app.training import encode_example, train_round
from silotune.adapters import adapter_state, attach_adapter, load_adapter_state
from silotune.config import ModelConfig, PeftSettings, TrainSettings, parse_run_config
from silotune.modeling import load_model

RECORDS = [
    {"instruction": "", "input": "shares rose after strong earnings", "output": "positive"},
    {"instruction": "", "input": "shares fell after weak guidance", "output": "negative"},
    {"instruction": "", "input": "the market was flat", "output": "neutral"},
]
STEPS = 3
KEEP = TrainSettings(local_steps=STEPS, batch_size=2, keep_optimizer_state=True)
RUN_ID = 77


def _setup(tiny_model: Path, rank: int = 4):  # noqa: ANN202
    loaded = load_model(ModelConfig(name=str(tiny_model)))
    model = attach_adapter(loaded.model, PeftSettings(rank=rank), seed=0)
    enc = [encode_example(loaded.tokenizer, get_template("finance"), r, 64, True) for r in RECORDS * 2]
    return model, loaded.tokenizer, enc


def _steps(state: dict[str, dict[str, Any]]) -> set[float]:
    return {float(s["step"]) for s in state.values()}


# --- the setting ---------------------------------------------------------------------------------


def test_off_by_default_everywhere() -> None:
    import tomllib

    assert TrainSettings().keep_optimizer_state is False
    assert parse_run_config({}).train.keep_optimizer_state is False
    assert parse_run_config({"train.keep-optimizer-state": True}).train.keep_optimizer_state is True
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"]["train.keep-optimizer-state"] is False


def test_compare_has_the_flag_and_says_which_optimizer_it_used() -> None:
    import argparse

    from evaluation.compare import register_arguments, step_rule

    parser = argparse.ArgumentParser()
    register_arguments(parser)
    assert parser.parse_args(["--data", "x"]).keep_optimizer_state is False
    assert parser.parse_args(["--data", "x", "--keep-optimizer-state"]).keep_optimizer_state is True
    assert "fresh AdamW per phase" in step_rule(3, 2, 4, 8)
    kept = step_rule(3, 2, 4, 8, keep_optimizer_state=True)
    assert "fresh AdamW" not in kept and "train.keep-optimizer-state" in kept


# --- train_round ---------------------------------------------------------------------------------


def test_without_the_setting_no_state_comes_back(tiny_model: Path) -> None:
    model, tok, enc = _setup(tiny_model)
    result = train_round(model, tok, enc, TrainSettings(local_steps=2, batch_size=2), lr=1e-2, seed=0)
    assert result.optimizer_state is None


def test_round_two_continues_round_one_and_differs_from_a_fresh_optimizer(tiny_model: Path) -> None:
    model, tok, enc = _setup(tiny_model)
    first = train_round(model, tok, enc, KEEP, lr=1e-2, seed=1)
    kept = first.optimizer_state
    assert kept is not None
    # Keyed by parameter name, every trainable one, one step per optimizer step.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(kept) == trainable and _steps(kept) == {float(STEPS)}
    after_one = adapter_state(model)

    second = train_round(model, tok, enc, KEEP, lr=5e-3, seed=2, optimizer_state=kept)
    assert second.optimizer_state is not None and _steps(second.optimizer_state) == {2.0 * STEPS}
    continued = adapter_state(model)

    load_adapter_state(model, after_one)  # the same starting adapter and seed, a fresh AdamW
    fresh = train_round(model, tok, enc, KEEP, lr=5e-3, seed=2)
    assert fresh.optimizer_state is not None and _steps(fresh.optimizer_state) == {float(STEPS)}
    restarted = adapter_state(model)
    assert any(not np.allclose(continued[k], restarted[k], atol=1e-7) for k in continued)
    # Round 1's state was copied, not shared: round 2 did not write into it.
    assert _steps(kept) == {float(STEPS)}


def test_round_two_runs_at_its_own_lr_not_round_ones(tiny_model: Path, monkeypatch) -> None:  # noqa: ANN001
    import torch

    model, tok, enc = _setup(tiny_model)
    kept = train_round(model, tok, enc, KEEP, lr=1e-2, seed=1).optimizer_state
    seen: list[float] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.extend(g["lr"] for g in self.param_groups)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train_round(model, tok, enc, KEEP, lr=2.5e-4, seed=2, optimizer_state=kept)
    assert seen and set(seen) == {2.5e-4}


def test_apply_state_sets_the_rounds_lr_even_over_a_saved_one(tiny_model: Path) -> None:
    import torch

    model, tok, enc = _setup(tiny_model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = train_round(model, tok, enc, KEEP, lr=1e-2, seed=1).optimizer_state
    opt = torch.optim.AdamW([p for _, p in named], lr=1.0)
    assert apply_state(opt, named, kept, lr=3e-4)
    assert [g["lr"] for g in opt.param_groups] == [3e-4]
    # The moments were loaded by name onto the right parameters.
    back = export_state(opt, named)
    for name in kept:
        assert torch.equal(back[name]["exp_avg_sq"], kept[name]["exp_avg_sq"])


def test_a_state_of_another_rank_is_ignored_with_a_warning(tiny_model: Path, caplog) -> None:  # noqa: ANN001
    model4, tok, enc = _setup(tiny_model, rank=4)
    kept = train_round(model4, tok, enc, KEEP, lr=1e-2, seed=1).optimizer_state
    model2, _, _ = _setup(tiny_model, rank=2)
    with caplog.at_level(logging.WARNING, logger="silo_node.app.optimizer_state"):
        result = train_round(model2, tok, enc, KEEP, lr=1e-2, seed=2, optimizer_state=kept)
    warnings = [r for r in caplog.records if "ignoring the kept AdamW state" in r.getMessage()]
    assert len(warnings) == 1 and "another rank" in warnings[0].getMessage()
    assert np.isfinite(result.train_loss)
    assert result.optimizer_state is not None and _steps(result.optimizer_state) == {float(STEPS)}


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda s, n: s.update({"not.a.parameter": s[n]}), "does not have"),
        (lambda s, n: s[n].pop("exp_avg_sq"), "expected"),
        (lambda s, n: s[n]["exp_avg"].fill_(float("nan")), "non-finite"),
        (lambda s, n: s[n]["exp_avg_sq"].fill_(-1.0), "negative"),
        (lambda s, n: s[n].update({"step": s[n]["step"] * 0}), "step is 0"),
    ],
)
def test_a_state_that_cannot_be_trusted_is_refused(tiny_model: Path, tamper, reason: str) -> None:  # noqa: ANN001
    model, tok, enc = _setup(tiny_model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = train_round(model, tok, enc, KEEP, lr=1e-2, seed=1).optimizer_state
    assert mismatch(kept, named) is None
    tamper(kept, named[0][0])
    assert reason in (mismatch(kept, named) or "")


# --- the store -----------------------------------------------------------------------------------


def test_the_file_round_trips_and_a_failed_write_leaves_no_stale_state(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import torch

    from silotune import atomic_files

    state = {
        "a.lora_A.weight": {
            "exp_avg": torch.ones(2, 3),
            "exp_avg_sq": torch.ones(2, 3),
            "step": torch.tensor(4.0),
        }
    }
    path = tmp_path / "optimizer" / "run-1-adamw.safetensors"
    OptimizerStore(path).save(state)
    assert path.stat().st_mode & 0o777 == 0o600  # moments of gradients stay the silo's
    back = OptimizerStore(path).load()
    assert back is not None and set(back) == set(state)
    assert all(torch.equal(back["a.lora_A.weight"][k], v) for k, v in state["a.lora_A.weight"].items())
    assert from_tensors(to_tensors(state)).keys() == state.keys()

    def disk_full(*a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", disk_full)
    OptimizerStore(path).save(state)  # does not raise: the round still counts
    assert not path.exists()  # an older round's state is not left behind to be taken for this one
    assert list(path.parent.iterdir()) == []  # and no temporary file


@pytest.mark.parametrize("content", [b"not a safetensors file", b""])
def test_an_unreadable_file_is_one_warning_and_nothing(tmp_path: Path, caplog, content: bytes) -> None:  # noqa: ANN001
    path = tmp_path / "run-1-adamw.safetensors"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="silo_node.app.optimizer_state"):
        assert OptimizerStore(path).load() is None
    assert [r.getMessage() for r in caplog.records if "unreadable optimizer state" in r.getMessage()]
    assert len(caplog.records) == 1


def test_a_safetensors_file_of_another_format_is_unreadable(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "run-1-adamw.safetensors"
    save_file({"x#exp_avg": torch.zeros(1)}, str(path), metadata={"format": "something-else"})
    assert OptimizerStore(path).load() is None
    save_file({"x#exp_avg": torch.zeros(1)}, str(path), metadata={"format": FORMAT})
    assert OptimizerStore(path).load() is not None


# --- the ClientApp -------------------------------------------------------------------------------


@pytest.fixture()
def silo(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A ClientApp train call for round ``n``: returns (reply, adapter sent back)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from silo_node.app import client_app, resident
    from silotune.adapters import from_array_record, to_array_record
    from silotune.wire_codec import Encoding, decode, encode, payload_shapes

    monkeypatch.delenv("SILOTUNE_SILO_POLICY", raising=False)
    data = tmp_path / "silo.jsonl"
    rows = [
        {
            "text": f"Company {i} shares {'rose' if i % 2 else 'fell'}",
            "label": ["negative", "positive"][i % 2],
        }
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local_model_policy = tmp_path / "policy.toml"
    local_model_policy.write_text("allow-local-paths = true\n")
    base = {
        "model.name": str(tiny_model), "peft.rank": 4, "train.local-steps": STEPS, "train.batch-size": 2,
        "train.seq-length": 48, "domain": "finance",
    }  # fmt: skip
    run = parse_run_config(base)
    init = resident.model_with_adapter(run.model, run.peft, 4, run.train.seed).init_state

    def call(server_round: int, arrays: dict | None = None, state_dir: bool = True, **extra: Any):  # noqa: ANN202
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
        node = {"data-path": str(data), "columns": "input=text,output=label", "name": "silo-a"}
        node["policy-file"] = str(local_model_policy)  # the tiny model is a local directory
        if state_dir:
            node["state-dir"] = str(tmp_path / "state")
        context = Context(
            run_id=RUN_ID, node_id=1, node_config=node, state=RecordDict(), run_config={**base, **extra}
        )
        config = ConfigRecord({"server-round": server_round, "lr": 5e-3})
        wire = encode(arrays or init, Encoding())  # the run's transport: fp32, packed
        content = RecordDict({"arrays": to_array_record(wire), "config": config})
        reply = client_app.train(Message(content, dst_node_id=1, message_type="train"), context)
        assert not reply.has_error(), reply.error
        got = from_array_record(reply.content["arrays"])
        return reply, decode(got, Encoding(), payload_shapes(got))

    call.path = tmp_path / "state" / "optimizer" / f"run-{RUN_ID}-adamw.safetensors"  # type: ignore[attr-defined]
    call.init = init  # type: ignore[attr-defined]
    yield call
    resident.release_model()


def test_the_clientapp_writes_nothing_when_off(silo) -> None:  # noqa: ANN001
    silo(1)
    assert not silo.path.parent.exists()


def test_the_clientapp_carries_the_state_on_disk_and_never_sends_it(silo) -> None:  # noqa: ANN001
    reply, adapter = silo(1, **{"train.keep-optimizer-state": True})
    kept = OptimizerStore(silo.path).load()
    assert kept is not None and _steps(kept) == {float(STEPS)}
    # The reply holds the adapter, nothing of the optimizer: same keys, same bytes as with it off.
    assert set(adapter) == set(silo.init)
    text = json.dumps({k: dict(v) for k, v in reply.content.items() if k != "arrays"}, default=str)
    assert "exp_avg" not in text and "optimizer" not in text
    off_reply, _ = silo(1, state_dir=False)
    assert reply.content["arrays"].count_bytes() == off_reply.content["arrays"].count_bytes()

    silo(2, adapter, **{"train.keep-optimizer-state": True})
    kept = OptimizerStore(silo.path).load()
    assert kept is not None and _steps(kept) == {2.0 * STEPS}


def test_without_a_state_dir_the_worker_keeps_it_in_memory(silo) -> None:  # noqa: ANN001
    from silo_node.app import resident
    from silotune.config import parse_silo_config

    _, adapter = silo(1, state_dir=False, **{"train.keep-optimizer-state": True})
    silo(2, adapter, state_dir=False, **{"train.keep-optimizer-state": True})
    assert not silo.path.parent.exists()
    slot = resident.optimizer_slot(RUN_ID, parse_silo_config({"data-path": "x", "name": "silo-a"}))
    assert _steps(slot["adamw"]) == {2.0 * STEPS}


def test_a_corrupt_file_is_ignored_then_overwritten(silo, caplog) -> None:  # noqa: ANN001
    silo.path.parent.mkdir(parents=True)
    silo.path.write_bytes(b"\x00garbage from a crashed disk")
    with caplog.at_level(logging.WARNING, logger="silo_node.app.optimizer_state"):
        silo(1, **{"train.keep-optimizer-state": True})
    assert len([r for r in caplog.records if "unreadable optimizer state" in r.getMessage()]) == 1
    kept = OptimizerStore(silo.path).load()
    assert kept is not None and _steps(kept) == {float(STEPS)}  # fresh, then rewritten whole
    assert sorted(p.name for p in silo.path.parent.iterdir()) == [silo.path.name]


# --- compare's in-process federation ------------------------------------------------------------


def test_the_inprocess_federation_honours_the_setting(tiny_model: Path) -> None:
    from evaluation.inprocess import AdapterBank, Silo, train_federated, train_isolated
    from silo_node.app.training import encode_records

    loaded = load_model(ModelConfig(name=str(tiny_model)))
    template = get_template("finance")
    silos = [
        Silo(f"silo-{i}", encode_records(loaded.tokenizer, template, RECORDS[i:] + RECORDS[:i], 64, True), 4)
        for i in range(2)
    ]
    flat = {"model.name": str(tiny_model), "peft.rank": 4, "train.local-steps": 2, "train.batch-size": 2}
    off = parse_run_config(flat)
    on = parse_run_config({**flat, "train.keep-optimizer-state": True})
    bank = AdapterBank(loaded.model, loaded.tokenizer, off.peft, off.train.seed)
    quiet = {"log": lambda _m: None}
    fed_off = train_federated(bank, silos, off, 3, **quiet)
    fed_on = train_federated(bank, silos, on, 3, **quiet)
    assert list(fed_on.state) == list(fed_off.state)
    assert all(np.isfinite(v).all() for v in fed_on.state.values())
    assert any(not np.allclose(fed_on.state[k], fed_off.state[k], atol=1e-7) for k in fed_on.state)
    # Round 1 starts fresh either way: the first round's loss is the same.
    assert fed_on.losses[0] == pytest.approx(fed_off.losses[0], rel=1e-6)
    # Isolated training keeps it too, so with one silo FedAvg is still isolated training.
    iso = train_isolated(bank, silos[0], on.train, 3, **quiet)
    one = train_federated(bank, silos[:1], on, 3, **quiet)
    for k in iso.state:
        np.testing.assert_array_equal(iso.state[k], one.state[k])
    iso_off = train_isolated(bank, silos[0], off.train, 3, **quiet)
    assert any(not np.allclose(iso.state[k], iso_off.state[k], atol=1e-7) for k in iso.state)
