"""Checkpoints are atomic (a crash mid-write leaves the previous one intact) and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import silotune.adapters as adapters
from superlink.app.checkpoints import CheckpointStore

PEFT_CFG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj"],
    "task_type": "CAUSAL_LM",
}


def _state(v: float) -> dict[str, np.ndarray]:
    return {
        "base_model.model.q_proj.lora_A.weight": np.full((2, 4), v, np.float32),
        "base_model.model.q_proj.lora_B.weight": np.full((4, 2), v, np.float32),
    }


def test_save_then_latest_round_trips(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1.0), PEFT_CFG, {"momentum/x": np.ones(3)}, {"run_config": {"a": 1}})
    path = store.save(2, _state(2.0), PEFT_CFG, {"momentum/x": np.full(3, 2.0)}, {"run_config": {"a": 1}})
    ck = store.latest()
    assert ck is not None and ck.round == 2 and ck.path == path
    np.testing.assert_array_equal(ck.adapter["base_model.model.q_proj.lora_A.weight"], 2.0)
    np.testing.assert_array_equal(ck.strategy_state["momentum/x"], 2.0)
    assert (tmp_path / "LATEST").read_text().strip() == "round-0002"
    assert (tmp_path / "adapter").resolve() == path.resolve()
    assert json.loads((path / "manifest.json").read_text())["round"] == 2


def test_crash_mid_write_leaves_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1.0), PEFT_CFG, {}, {})
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "round-0001").iterdir()}

    def crash(path: Path, obj: object, **kw: object) -> None:  # after the weights, before the config
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(adapters, "atomic_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        store.save(2, _state(2.0), PEFT_CFG, {}, {})
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "round-0002").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert (tmp_path / "LATEST").read_text().strip() == "round-0001"
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "round-0001").iterdir()}
    assert after == before
    ck = store.latest()
    assert ck is not None and ck.round == 1


def test_killed_process_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1.0), PEFT_CFG, {}, {})
    # A process killed mid-write leaves a hidden temp dir with a half-written file.
    half = tmp_path / "checkpoints" / ".tmp-round-0002-abc"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    ck = store.latest()
    assert ck is not None and ck.round == 1
    store.save(2, _state(2.0), PEFT_CFG, {}, {})
    assert not half.exists()


def test_damaged_latest_falls_back_to_newest_complete(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1.0), PEFT_CFG, {}, {})
    store.save(2, _state(2.0), PEFT_CFG, {}, {})
    (tmp_path / "checkpoints" / "round-0002" / "adapter_model.safetensors").write_bytes(b"garbage")
    ck = store.latest()
    assert ck is not None and ck.round == 1


def test_keep_prunes_old_rounds(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(1, 5):
        store.save(r, _state(float(r)), PEFT_CFG, {}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-0003", "round-0004"]


def test_checkpoint_loads_with_peft(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from silotune.adapters import adapter_state, attach_adapter, peft_config_dict
    from silotune.config import PeftSettings
    from tests.support.tiny_model import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = attach_adapter(base, PeftSettings(rank=2, alpha=4))
    state = adapter_state(peft_model)
    state = {k: (v + 0.5 if "lora_B" in k else v) for k, v in state.items()}  # non-zero update
    path = CheckpointStore(tmp_path / "run").save(1, state, peft_config_dict(peft_model), {}, {})
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(fresh, path)
        after = loaded(input_ids=ids).logits
    assert not torch.allclose(before, after)
    np.testing.assert_allclose(adapter_state(loaded)[next(iter(state))], state[next(iter(state))])


def test_every_checkpoint_file_and_directory_entry_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    CheckpointStore(run_dir).save(1, _state(1.0), PEFT_CFG, {"momentum/x": np.ones(3)}, {})
    # Files are synced inside the temporary directory, before the rename publishes them.
    names = {Path(p).name for p in synced}
    for name in ("adapter_model.safetensors", "strategy_state.safetensors"):
        assert name in names, f"{name} was never fsynced"
    for name in ("adapter_config.json", "manifest.json", "LATEST"):  # atomic_write_*'s temp files
        assert any(n.startswith(f".{name}.") for n in names), f"{name} was never fsynced"
    dirs = set(synced)
    assert str(run_dir) in dirs  # checkpoints/ created, LATEST and the adapter link replaced
    assert str(run_dir / "checkpoints") in dirs  # the round directory renamed into place
    assert any(Path(p).name.startswith(".tmp-round-0001-") for p in dirs)  # the files' entries
