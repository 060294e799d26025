"""The silo's guard: a round that cannot have learned anything is an error, never an update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from silo_node.app.templates import get_template
from silo_node.app.training import encode_example, train_round
from silotune.adapters import adapter_state, attach_adapter
from silotune.config import ModelConfig, PeftSettings, TrainSettings
from silotune.errors import NoLearningError
from silotune.modeling import load_model

RECORD = {"instruction": "", "input": "shares rose after strong earnings", "output": "positive"}


def _setup(tiny_model: Path):  # noqa: ANN202
    loaded = load_model(ModelConfig(name=str(tiny_model)))
    model = attach_adapter(loaded.model, PeftSettings(rank=4), seed=0)
    enc = [encode_example(loaded.tokenizer, get_template("finance"), RECORD, 64, True)] * 4
    return model, loaded.tokenizer, enc


def _hook_every_adapter_grad(model, fn) -> None:  # noqa: ANN001
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(fn)


def test_a_normal_round_passes_the_guard(tiny_model: Path) -> None:
    model, tok, enc = _setup(tiny_model)
    before = adapter_state(model)
    train_round(model, tok, enc, TrainSettings(local_steps=2, batch_size=2), lr=1e-2, seed=0)
    after = adapter_state(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_learning_rate_zero_is_an_error_not_an_update(tiny_model: Path) -> None:
    model, tok, enc = _setup(tiny_model)
    before = adapter_state(model)
    with pytest.raises(NoLearningError, match="no trainable parameter changed in 2 steps"):
        train_round(model, tok, enc, TrainSettings(local_steps=2, batch_size=2), lr=0.0, seed=0)
    after = adapter_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_all_zero_gradients_are_an_error(tiny_model: Path) -> None:
    """What bitsandbytes' inference repacking did to QLoRA: no gradient reaches the adapter."""
    model, tok, enc = _setup(tiny_model)
    _hook_every_adapter_grad(model, lambda g: g * 0.0)
    with pytest.raises(NoLearningError, match="every gradient was exactly zero in all 3 steps"):
        train_round(model, tok, enc, TrainSettings(local_steps=3, batch_size=2), lr=1e-2, seed=0)


def test_non_finite_gradients_are_skipped_and_an_error_when_every_step_has_them(tiny_model: Path) -> None:
    model, tok, enc = _setup(tiny_model)
    before = adapter_state(model)
    _hook_every_adapter_grad(model, lambda g: g * float("inf"))
    with pytest.raises(NoLearningError, match="non-finite in all 2 steps"):
        train_round(model, tok, enc, TrainSettings(local_steps=2, batch_size=2), lr=1e-2, seed=0)
    # Skipped, not applied: no NaN was written into the adapter.
    after = adapter_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_one_bad_step_among_good_ones_still_trains(tiny_model: Path) -> None:
    model, tok, enc = _setup(tiny_model)
    calls = {"n": 0}
    params = [p for p in model.parameters() if p.requires_grad]

    def first_step_inf(g):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return g * float("inf") if calls["n"] <= len(params) else g

    _hook_every_adapter_grad(model, first_step_inf)
    result = train_round(model, tok, enc, TrainSettings(local_steps=3, batch_size=2), lr=1e-2, seed=0)
    assert np.isfinite(result.train_loss)
    assert all(np.isfinite(v).all() for v in adapter_state(model).values())
