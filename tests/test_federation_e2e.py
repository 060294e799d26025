"""End to end through Flower: a real SuperLink and 3 real SuperNodes (TLS + node authentication) on
loopback, training a tiny random Llama. Shows how to submit a run (LocalFederation.submit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.local_federation import LocalFederation, SiloSpec
from tests.support.federation_runs import RANKS, run_config, run_events, write_silo_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    ws = tmp_path_factory.mktemp("fed")
    silos = []
    for i, (name, rank) in enumerate(RANKS.items()):
        data = ws / f"{name}.jsonl"
        write_silo_data(data, seed=i)
        silos.append(SiloSpec(name, data, {"columns": "input=text,output=label", "lora-rank": rank}))
    with LocalFederation(ws / "workspace", silos) as fed:
        yield fed


def _logits(model, ids):  # noqa: ANN001, ANN202
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fedavg_rounds_save_a_loadable_adapter_that_changes_outputs(federation, tiny_model) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = federation.submit(run_config(tiny_model, "fedavg", **{"strategy.name": "fedavg"}), timeout=900)
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert all(r["answered"] == 3 for r in result.rounds)
    events = run_events(federation, "fedavg")
    results = [e for e in events if e["kind"] == "silo_result"]
    assert sorted({e["silo"] for e in results}) == sorted(RANKS)
    assert len(results) == 6  # 3 silos x 2 rounds
    # Non-FlexLoRA strategies train every silo at the global rank, whatever lora-rank says.
    assert {e["lora_rank"] for e in results} == {8}

    adapter_dir = Path(result.adapter_dir)
    assert adapter_dir.name == "round-0002"
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    assert manifest["round"] == 2 and manifest["base_model"]["sha256"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    before = _logits(base, ids)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    after = _logits(tuned, ids)
    assert not torch.allclose(before, after), "the federated adapter did not change the outputs"


def test_flexlora_with_heterogeneous_ranks(federation, tiny_model) -> None:
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    result = federation.submit(run_config(tiny_model, "flex", **{"strategy.name": "flexlora"}), timeout=900)
    assert [r["answered"] for r in result.rounds] == [3, 3]
    results = [e for e in run_events(federation, "flex") if e["kind"] == "silo_result"]
    assert {e["silo"]: e["lora_rank"] for e in results} == RANKS
    # Each silo received and returned factors at its own rank: uplink bytes grow with the rank.
    up = {e["silo"]: e["uplink_bytes"] for e in results if e["round"] == 2}
    assert up["hospital-a"] < up["hospital-b"] < up["bank-c"]
    adapter_dir = Path(result.adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == max(RANKS.values())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a_keys = [k for k in tensors if k.endswith("lora_A.weight")]
    assert a_keys and all(tensors[k].shape[0] == 8 for k in a_keys)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir)


def test_interrupted_run_resumes_from_its_last_checkpoint(federation, tiny_model) -> None:
    first = federation.submit(run_config(tiny_model, "resume", **{"num-rounds": 1}), timeout=900)
    assert [r["round"] for r in first.rounds] == [1]
    second = federation.submit(run_config(tiny_model, "resume", **{"num-rounds": 3}), timeout=900)
    assert [r["round"] for r in second.rounds] == [2, 3]
    starts = [e for e in run_events(federation, "resume") if e["kind"] == "run_start"]
    assert [s["start_round"] for s in starts] == [1, 2]


def test_compare_and_a_deployed_run_share_one_round_core(federation, tiny_model) -> None:
    """`silotune compare`'s in-process federation and a real Flower run, same config and seed, two
    rounds: the same global adapter, because both run superlink/app/round_core.py and the silo's own
    train_round with round_seed. Any drift between the two (a defence, a weight, a seed) shows here."""
    import numpy as np

    from evaluation.inprocess import AdapterBank, Silo, train_federated
    from silo_node.app.data import load_silo_records, split_train_eval
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_records
    from silotune.config import parse_run_config, parse_silo_config
    from silotune.modeling import load_model
    from superlink.app.checkpoints import CheckpointStore

    values = run_config(tiny_model, "core", **{"strategy.name": "fedavg"})
    federation.submit(values, timeout=900)
    deployed = CheckpointStore(federation.runs_root / "core").latest()
    assert deployed is not None and deployed.round == 2

    run = parse_run_config({k: v for k, v in values.items() if k != "run-dir"})
    loaded = load_model(run.model)
    bank = AdapterBank(loaded.model, loaded.tokenizer, run.peft, run.train.seed)
    silos = []
    for i, name in enumerate(RANKS):
        data = federation.ws / f"{name}-core.jsonl"
        write_silo_data(data, seed=i)
        cfg = parse_silo_config({"data-path": str(data), "columns": "input=text,output=label", "name": name})
        train, _ = split_train_eval(load_silo_records(cfg, run.domain), cfg.eval_fraction, run.train.seed)
        examples = encode_records(
            loaded.tokenizer, get_template(run.domain), train, run.train.seq_length,
            run.model.use_chat_template, run.train.prompt_style,
        )  # fmt: skip
        silos.append(Silo(name, examples, run.peft.rank))
    inproc = train_federated(bank, silos, run, 2, log=lambda _m: None)

    assert sorted(inproc.state) == sorted(deployed.adapter)
    worst = max(float(np.max(np.abs(inproc.state[k] - deployed.adapter[k]))) for k in inproc.state)
    assert worst <= 1e-5, f"compare and the deployed run differ by up to {worst:g}"
    assert any(np.abs(v).sum() > 0 for k, v in inproc.state.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_two_rounds_in_each_transport_format(federation, tiny_model, dtype: str) -> None:
    """Real processes, adapters packed by silotune/wire_codec.py both ways; the checkpoint stays a
    full-precision PEFT directory. (The tiny model's adapter is 1,792 values, so the codec's
    metadata weighs a lot here; the ratios on a real adapter are in tests/test_wire_codec.py.)"""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    run_dir = f"transport-{dtype}"
    result = federation.submit(
        run_config(tiny_model, run_dir, **{"transport.dtype": dtype, "train.local-steps": 1}), timeout=900
    )
    assert [r["answered"] for r in result.rounds] == [3, 3]
    events = run_events(federation, run_dir)
    assert not [e for e in events if e["kind"] == "update_rejected"]
    results = [e for e in events if e["kind"] == "silo_result"]
    assert len(results) == 6
    for e in results:
        assert e["uplink_bytes"] < e["uplink_fp32_bytes"] and e["downlink_bytes"] < e["downlink_fp32_bytes"]
    tensors = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in tensors.values()} == {"float32"}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_dir)
