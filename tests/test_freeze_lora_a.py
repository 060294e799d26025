"""``peft.freeze-lora-a`` (FFA-LoRA): silos train only each LoRA pair's B, with and without DP.

What must hold: A never moves (plain rounds, DP rounds, the aggregate), B does; DP's per-record
clipping then covers B's coordinates only; and the settings that cannot keep A are refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from silotune.adapters import A_SUFFIX, B_SUFFIX, lora_modules
from silotune.config import ConfigError, RunConfig, parse_run_config


def _run(tiny_model: Path, **extra: object) -> RunConfig:
    return parse_run_config(
        {"model.name": str(tiny_model), "train.batch-size": 2, "train.local-steps": 3,
         "train.seq-length": 32, "peft.rank": 4, "peft.dropout": 0.0, "peft.freeze-lora-a": True, **extra}
    )  # fmt: skip


def _examples(tok: object, n: int = 6) -> list:
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_example

    rows = [
        {"instruction": "", "input": f"item {i} " + "w " * i, "output": ["up", "down"][i % 2]}
        for i in range(n)
    ]
    return [encode_example(tok, get_template("finance"), r, 32, True) for r in rows]


def test_the_flat_key_parses_and_defaults_off() -> None:
    assert parse_run_config({}).peft.freeze_lora_a is False
    assert parse_run_config({"peft.freeze-lora-a": True}).peft.freeze_lora_a is True


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"peft.method": "ia3"}, "ia3 has no A"), ({"strategy.name": "flexlora"}, "flexlora")],
    ids=["ia3", "flexlora"],
)
def test_settings_that_cannot_keep_a_are_refused(extra: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match="freeze-lora-a") as err:
        parse_run_config({"peft.freeze-lora-a": True, **extra})
    assert named in str(err.value)


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_a_round_moves_b_and_leaves_a_bit_for_bit(tiny_model: Path, private: bool) -> None:
    from silo_node.app.policy import PrivacyPolicy
    from silo_node.app.privacy import plan_round, train_round_dp
    from silo_node.app.training import train_round
    from silotune.adapters import adapter_state, attach_adapter
    from silotune.modeling import load_model

    run = _run(tiny_model)
    loaded = load_model(run.model)
    model = attach_adapter(loaded.model, run.peft, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    examples = _examples(loaded.tokenizer)
    before = adapter_state(model)
    if private:
        policy = PrivacyPolicy(delta=1e-5, noise_multiplier=1.0, epsilon_budget=1e6, min_logical_batch=6)
        plan = plan_round(policy, run, n_examples=len(examples))
        res = train_round_dp(model, loaded.tokenizer, examples, run.train, lr=1e-2, seed=0, plan=plan)
    else:
        res = train_round(model, loaded.tokenizer, examples, run.train, lr=1e-2, seed=0)
    after = adapter_state(model)
    assert math.isfinite(res.train_loss)
    mods = lora_modules(after)
    assert mods
    for m in mods:
        assert np.array_equal(before[m + A_SUFFIX], after[m + A_SUFFIX]), m
    assert any(not np.array_equal(before[m + B_SUFFIX], after[m + B_SUFFIX]) for m in mods)
    # Trained again without the flag, the same adapter moves its A: the flag is what kept it.
    free = attach_adapter(
        load_model(run.model).model, run.peft.model_copy(update={"freeze_lora_a": False}), seed=0
    )
    train_round(free, loaded.tokenizer, examples, run.train, lr=1e-2, seed=0)
    moved = adapter_state(free)
    assert any(not np.array_equal(before[m + A_SUFFIX], moved[m + A_SUFFIX]) for m in mods)


def test_dp_clips_each_records_gradient_over_b_alone(tiny_model: Path) -> None:
    import torch

    from silo_node.app.privacy import DPRound, dp_step, dp_wrapped, make_dp_optimizer, per_sample_loss
    from silo_node.app.training import collate
    from silotune.adapters import attach_adapter
    from silotune.modeling import load_model

    run = _run(tiny_model)
    loaded = load_model(run.model)
    model = attach_adapter(loaded.model, run.peft, seed=0)
    model.train()
    with torch.no_grad():  # B = 0 gives A no gradient; here A is frozen anyway, B needs none
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.1)
    params = [q for q in model.parameters() if q.requires_grad]
    examples = _examples(loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id or 0
    per_record = []
    for e in examples:
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, collate([e], pad)).sum().backward()
        per_record.append(torch.cat([q.grad.flatten().clone() for q in params]))
    model.zero_grad(set_to_none=True)
    clip = float(min(g.norm() for g in per_record)) / 4
    plan = DPRound(noise_multiplier=0.0, sample_rate=1.0, steps=1, expected_batch_size=len(examples),
                   max_grad_norm=clip, delta=1e-5, budget=1.0)  # fmt: skip
    with dp_wrapped(model) as gsm:
        opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), plan, torch.device("cpu"))
        dp_step(gsm, opt, examples, list(range(len(examples))), 4, pad, torch.device("cpu"))
        got = torch.cat([q.grad.flatten().clone() for q in params])
        assert all(q.grad is None for n, q in model.named_parameters() if ".lora_A." in n)
        opt.zero_grad(set_to_none=True)
    want = sum(g * (clip / (g.norm() + 1e-6)) for g in per_record) / len(examples)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_fedavg_of_frozen_a_silos_averages_the_products_exactly(tiny_model: Path) -> None:
    from superlink.app.strategies import get_strategy
    from superlink.app.strategies.base import SiloUpdate

    run = _run(tiny_model)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 16)).astype(np.float32)
    glob = {"m" + A_SUFFIX: a, "m" + B_SUFFIX: np.zeros((16, 4), np.float32)}
    bs = [rng.normal(size=(16, 4)).astype(np.float32) for _ in range(3)]
    updates = [
        SiloUpdate(i, {"m" + A_SUFFIX: a.copy(), "m" + B_SUFFIX: b}, 10 * (i + 1)) for i, b in enumerate(bs)
    ]
    out = get_strategy(run.strategy, run.peft).aggregate(glob, updates)
    assert np.array_equal(out["m" + A_SUFFIX], a)
    w = np.array([10, 20, 30]) / 60
    want = sum(wi * (b @ a) for wi, b in zip(w, bs, strict=True))
    np.testing.assert_allclose(out["m" + B_SUFFIX] @ out["m" + A_SUFFIX], want, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("flower_task_identity")
def test_a_dp_silos_clientapp_round_sends_back_the_a_it_received(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resident worker's path: handshake, then a DP round of a frozen-A run through the ClientApp."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from silotune.adapters import from_array_record
    from silotune.wire_codec import decode, decode_uplink, encoding_for, payload_shapes
    from tests.support.clientapp_silo import ClientAppSilo

    monkeypatch.setenv("SILOTUNE_EVENTS_DIR", str(tmp_path / "events"))
    cfg = {"model.name": str(tiny_model), "peft.rank": 2, "train.batch-size": 4, "train.local-steps": 2,
           "train.seq-length": 48, "num-rounds": 2, "peft.freeze-lora-a": True}  # fmt: skip
    policy = "allow-local-paths = true\n[privacy]\nnoise-multiplier = 1.0\nepsilon-budget = 50.0\n"
    silo = ClientAppSilo(tmp_path, "bank-a", cfg, policy)

    def msg(kind: str, content: RecordDict) -> Message:
        m = Message(content=content, dst_node_id=0, message_type=kind)
        m.metadata.__dict__["_message_id"] = "m-1"
        return m

    hello = silo.reply(msg(MessageType.QUERY, RecordDict({"config": ConfigRecord({"want-init": True})})))
    enc = encoding_for(parse_run_config(cfg).transport)
    sent_arrays = from_array_record(hello["arrays"])
    sent = decode(sent_arrays, enc, payload_shapes(sent_arrays))
    config = ConfigRecord({"server-round": 1, "lr": 1e-2})
    reply = silo.reply(msg(MessageType.TRAIN, RecordDict({"config": config, "arrays": hello["arrays"]})))
    got = decode_uplink(from_array_record(reply["arrays"]), sent, enc)
    mods = lora_modules(got)
    assert mods and all(np.array_equal(got[m + A_SUFFIX], sent[m + A_SUFFIX]) for m in mods)
    assert any(not np.array_equal(got[m + B_SUFFIX], sent[m + B_SUFFIX]) for m in mods)
